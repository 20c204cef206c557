//! The optimizer step over every trainable tensor at once: the gradients' global norm, torch's
//! clipping coefficient and AdamW, on CUDA in three launches whatever the number of tensors
//! (`triton/adamw.py`: `grad_sumsq`, `clip_norm`, `adamw_multi`, committed as cubins), with the
//! norm read back once, after the update is queued. One launch per op and tensor made about
//! six per tensor (a Qwen2-0.5B has 290), and the clipping coefficient a host round trip
//! between the backward and the update.
//!
//! The tensors travel as a table of device addresses, cut in chunks of one tensor each (apex's
//! multi_tensor_apply layout). Tensors whose moments are 8-bit (`train.optim = "adamw_8bit"`)
//! join the same table and norm, and take a fourth launch (`triton/adamw8.py`, [`step_8bit`]);
//! the CPU's loops for them are `train::adamw8`'s. The CPU computes the same step with the same structure (each
//! chunk's sum of squares in f32, their total in f64, then the per-tensor update loops of
//! [`super::adamw`]), which is what a device's step is checked against (`refdpo selftest`).

use super::adamw::{adamw_moment, adamw_weight, Moment, Weight};
use super::elem::{self, slice, Elem};
use candle_core::backend::BackendStorage;
use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

const NAME: &str = "adamw step";

/// Elements per chunk: `adamw.CHUNK` (the CPU's chunks; a launch reads the kernels' own).
pub const CHUNK: usize = 65536;

/// One tensor's part in the step: master weights (f32, or bf16 rounded stochastically), moments
/// and gradient in the state dtype.
pub struct Slot<'a> {
    pub w: &'a Tensor,
    pub m: &'a Tensor,
    pub v: &'a Tensor,
    pub g: &'a Tensor,
    /// Whether weight decay applies (HF's Trainer exempts biases and norms).
    pub decays: bool,
    /// Seeds of m's, v's and w's stochastic rounding (bf16 state, bf16 weights).
    pub seeds: [u32; 3],
}

/// One tensor whose moments are stored blockwise in 8 bits (bitsandbytes' `AdamW8bit`): master
/// weights, gradient in the state dtype, each moment's codes (u8, one per value) and absmax
/// (f32, one per 256 values).
pub struct Slot8<'a> {
    pub w: &'a Tensor,
    pub g: &'a Tensor,
    pub m_codes: &'a Tensor,
    pub m_absmax: &'a Tensor,
    pub v_codes: &'a Tensor,
    pub v_absmax: &'a Tensor,
    pub decays: bool,
    /// Seed of w's stochastic rounding (bf16 weights).
    pub seed: u32,
}

/// The 8-bit tensors of a step and the two maps: `maps` [2, 256] f32 (the signed map for m, the
/// unsigned one for v), `bounds` [2, 256] f32 (each map's 255 midpoints, then +∞).
pub struct Eight<'a> {
    pub slots: &'a [Slot8<'a>],
    pub maps: &'a Tensor,
    pub bounds: &'a Tensor,
}

/// Values per absmax of 8-bit moments (`adamw8.QBLOCK`).
pub const QBLOCK: usize = 256;

/// The step's scalars, in f64 (rounded to f32 at the update, as the composed ops round theirs).
#[derive(Debug, Clone, Copy)]
pub struct Hyper {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// 1 − lr · weight_decay, for the tensors that decay.
    pub decay: f64,
    /// lr / (1 − β1^t)
    pub lr_bc1: f64,
    /// 1 / √(1 − β2^t)
    pub inv_sqrt_bc2: f64,
}

/// torch's `clip_grad_norm_` coefficient: max_norm / (norm + 1e-6) when that is below 1, else 1
/// (and 1 when clipping is off, max_norm <= 0).
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    let coef = max_norm / (norm + 1e-6);
    if max_norm > 0.0 && coef < 1.0 {
        coef
    } else {
        1.0
    }
}

/// The most elements a tensor may have: a chunk's lanes reach `start + CHUNK - 1` in the
/// kernels' 32-bit offsets, which must not wrap past 2^31.
const MAX_ELEMS: usize = i32::MAX as usize - CHUNK;

/// Why the step's kernels cannot run on `device` (None: they can): a GPU the cubins were not
/// compiled for (they are for sm_80 and sm_90) takes the composed ops, as the attention does.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn uncovered_device(device: &Device) -> Option<String> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => super::cubins::launch::arch(dev)
            .err()
            .map(|e| e.to_string()),
        _ => None,
    }
}

/// Why these slots cannot take the step over all tensors at once (None: they can): one device
/// the kernels were compiled for, weights in one dtype and moments and gradients in one state
/// dtype (each f32 or bf16), contiguous, each under 2^31 elements less a chunk (the kernels'
/// offsets).
pub fn unsupported(slots: &[Slot<'_>]) -> Option<String> {
    let first = slots.first()?;
    if let Some(why) = uncovered_device(first.w.device()) {
        return Some(why);
    }
    let (state, weights) = (first.m.dtype(), first.w.dtype());
    for (what, dtype) in [("moments", state), ("weights", weights)] {
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return Some(format!("{what} in {dtype:?}"));
        }
    }
    for s in slots {
        for (what, t, dtype) in [
            ("weights", s.w, weights),
            ("first moment", s.m, state),
            ("second moment", s.v, state),
            ("gradient", s.g, state),
        ] {
            if t.dtype() != dtype {
                return Some(format!("a {what} in {:?}, not {dtype:?}", t.dtype()));
            }
            if !t.device().same_device(first.w.device()) {
                return Some("tensors on several devices".into());
            }
            if !t.is_contiguous() {
                return Some(format!("a non-contiguous {what}"));
            }
            if t.dims() != s.w.dims() {
                return Some(format!(
                    "a {what} of shape {:?} for weights {:?}",
                    t.dims(),
                    s.w.dims()
                ));
            }
        }
        if s.w.elem_count() > MAX_ELEMS {
            return Some(format!(
                "a tensor of {} elements (the kernels' offsets take under 2^31 - 2^16)",
                s.w.elem_count()
            ));
        }
    }
    None
}

/// Why `eight` cannot join a step whose dense slots are `dense` on CUDA (None: it can): each
/// tensor on the dense ones' device (one the kernels were compiled for), weights and gradients
/// in their dtypes (each f32 or bf16), codes u8 and absmax f32 of the weights' length,
/// contiguous, under 2^31 elements less a chunk.
pub fn unsupported_8bit(dense: &[Slot<'_>], eight: &Eight<'_>) -> Option<String> {
    let first = eight.slots.first()?;
    let (weights, grads) = dense
        .first()
        .map_or((first.w.dtype(), first.g.dtype()), |d| {
            (d.w.dtype(), d.g.dtype())
        });
    let device = dense.first().map_or(first.w.device(), |d| d.w.device());
    if let Some(why) = uncovered_device(device) {
        return Some(why);
    }
    for (what, dtype) in [("weights", weights), ("gradients", grads)] {
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return Some(format!("8-bit moments beside {what} in {dtype:?}"));
        }
    }
    for t in [eight.maps, eight.bounds] {
        if t.dims() != [2, QBLOCK] || t.dtype() != DType::F32 || !t.is_contiguous() {
            return Some(format!("8-bit maps of {:?} {:?}", t.dtype(), t.dims()));
        }
    }
    for s in eight.slots {
        let n = s.w.elem_count();
        let blocks = n.div_ceil(QBLOCK);
        for (what, t, dtype, len) in [
            ("weights", s.w, weights, n),
            ("gradient", s.g, grads, n),
            ("first moment's codes", s.m_codes, DType::U8, n),
            ("second moment's codes", s.v_codes, DType::U8, n),
            ("first moment's absmax", s.m_absmax, DType::F32, blocks),
            ("second moment's absmax", s.v_absmax, DType::F32, blocks),
        ] {
            if t.dtype() != dtype || t.elem_count() != len {
                return Some(format!(
                    "an 8-bit tensor's {what} in {:?} of {} values, not {dtype:?} of {len}",
                    t.dtype(),
                    t.elem_count()
                ));
            }
            if !t.is_contiguous() {
                return Some(format!("an 8-bit tensor's non-contiguous {what}"));
            }
            if !t.device().same_device(device) {
                return Some("tensors on several devices".into());
            }
        }
        if n > MAX_ELEMS {
            return Some(format!(
                "a tensor of {n} elements (the kernels' offsets take under 2^31 - 2^16)"
            ));
        }
    }
    None
}

/// [`step`] with tensors whose moments are 8-bit besides the dense `slots`, on CUDA: the norm
/// over every gradient, then each kind's update in one launch. The slots must pass
/// [`unsupported`], and `eight` [`unsupported_8bit`]. On the CPU the trainer runs
/// [`cpu_update`] and `train::adamw8`'s loops instead.
pub fn step_8bit(slots: &[Slot<'_>], eight: &Eight<'_>, h: Hyper, max_norm: f64) -> Result<f64> {
    let Some(w) = slots
        .first()
        .map(|s| s.w)
        .or(eight.slots.first().map(|s| s.w))
    else {
        return Ok(0.0);
    };
    #[cfg(not(feature = "cuda"))]
    let _ = (h, max_norm);
    match w.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => cuda::step(dev, slots, Some(eight), h, max_norm),
        other => Err(candle_core::Error::Msg(format!(
            "the fused 8-bit optimizer step runs on CUDA, not {other:?}: the CPU's is train::adamw8"
        ))),
    }
}

/// Clips the gradients to `max_norm` (torch's coefficient) and takes one AdamW step on every
/// slot, in place. Returns the gradients' global norm; when it is not finite, nothing is
/// changed. The slots must pass [`unsupported`].
pub fn step(slots: &[Slot<'_>], h: Hyper, max_norm: f64) -> Result<f64> {
    let Some(first) = slots.first() else {
        return Ok(0.0);
    };
    match first.w.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => cuda::step(dev, slots, None, h, max_norm),
        Device::Cpu => cpu_step(slots, h, max_norm),
        other => Err(candle_core::Error::Msg(format!(
            "the fused optimizer step runs on the CPU or CUDA, not {other:?}"
        ))),
    }
}

/// Elements per iteration within a chunk: `adamw.BLOCK`, the kernels' lanes.
const LANES: usize = 1024;

/// The gradients' global norm as the kernels take it: each chunk's squares summed in f32 lanes,
/// the lanes halved pairwise, the chunks' sums totalled in f64 in order. The chunks run over the
/// CPU's threads, read where the gradient lies (no f32 copy of it).
fn cpu_norm(slots: &[Slot<'_>]) -> Result<f64> {
    let grads: Vec<&Tensor> = slots.iter().map(|s| s.g).collect();
    cpu_grad_norm(&grads)
}

/// The global norm of `grads` (CPU tensors, contiguous) as the fused step takes it, for a step
/// whose tensors do not all take [`step`] (8-bit moments): the same value for the same gradients.
pub fn cpu_grad_norm(grads: &[&Tensor]) -> Result<f64> {
    let mut total = 0f64;
    for g in grads {
        let (storage, layout) = g.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!(
                "the CPU's optimizer step got a gradient on {:?}",
                g.device()
            );
        };
        let sums = match cpu.dtype() {
            DType::F32 => chunk_sums(slice::<f32>(NAME, cpu, layout)?),
            DType::BF16 => chunk_sums(slice::<half::bf16>(NAME, cpu, layout)?),
            DType::F16 => chunk_sums(slice::<half::f16>(NAME, cpu, layout)?),
            other => return Err(elem::unsupported(NAME, other)),
        };
        total += sums.iter().sum::<f64>();
    }
    Ok(total.sqrt())
}

/// Each [`CHUNK`]'s sum of squares, as the kernel's lanes take it.
fn chunk_sums<T: Elem>(g: &[T]) -> Vec<f64> {
    g.par_chunks(CHUNK)
        .map(|chunk| {
            let mut lanes = [0f32; LANES];
            for block in chunk.chunks(LANES) {
                for (acc, x) in lanes.iter_mut().zip(block) {
                    let x = x.f();
                    *acc += x * x;
                }
            }
            let mut width = LANES;
            while width > 1 {
                width /= 2;
                for i in 0..width {
                    lanes[i] += lanes[i + width];
                }
            }
            f64::from(lanes[0])
        })
        .collect()
}

fn cpu_step(slots: &[Slot<'_>], h: Hyper, max_norm: f64) -> Result<f64> {
    let norm = cpu_norm(slots)?;
    if !norm.is_finite() {
        return Ok(norm);
    }
    cpu_update(slots, h, clip_coefficient(norm, max_norm))?;
    Ok(norm)
}

/// The CPU's AdamW on every slot with the gradients scaled by `grad_scale` (the clipping
/// coefficient, taken over these and other tensors by the caller).
pub fn cpu_update(slots: &[Slot<'_>], h: Hyper, grad_scale: f64) -> Result<()> {
    for s in slots {
        for (x, beta, seed, square) in [
            (s.m, h.beta1, s.seeds[0], false),
            (s.v, h.beta2, s.seeds[1], true),
        ] {
            let op = Moment {
                beta,
                grad_scale,
                seed,
                square,
            };
            adamw_moment(x, s.g, op)?;
        }
        let op = Weight {
            decay: if s.decays { h.decay } else { 1.0 },
            lr_bc1: h.lr_bc1,
            inv_sqrt_bc2: h.inv_sqrt_bc2,
            eps: h.eps,
            seed: s.seeds[2],
        };
        adamw_weight(s.w, s.m, s.v, op)?;
    }
    Ok(())
}

#[cfg(feature = "cuda")]
mod cuda;

#[cfg(test)]
mod tests {
    use super::*;

    fn slot_tensors(n: usize, state: DType) -> [Tensor; 4] {
        let dev = Device::Cpu;
        let randn = || Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        [
            randn(),
            Tensor::zeros(n, state, &dev).unwrap(),
            Tensor::zeros(n, state, &dev).unwrap(),
            randn().to_dtype(state).unwrap(),
        ]
    }

    fn hyper(step: i32) -> Hyper {
        let (lr, b1, b2) = (1e-3, 0.9, 0.999);
        Hyper {
            beta1: b1,
            beta2: b2,
            eps: 1e-8,
            decay: 1.0 - lr * 0.01,
            lr_bc1: lr / (1.0 - f64::powi(b1, step)),
            inv_sqrt_bc2: 1.0 / (1.0 - f64::powi(b2, step)).sqrt(),
        }
    }

    #[test]
    fn the_norm_and_clipping_are_torchs() {
        // chunks cut inside the first tensor; the norm against the f64 sum
        let a = slot_tensors(CHUNK + 300, DType::F32);
        let b = slot_tensors(7, DType::F32);
        let slots = [&a, &b].map(|[w, m, v, g]| Slot {
            w,
            m,
            v,
            g,
            decays: true,
            seeds: [0; 3],
        });
        let exact = [&a[3], &b[3]]
            .iter()
            .map(|g| {
                g.to_dtype(DType::F64)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            })
            .sum::<f64>()
            .sqrt();
        let w0 = a[0].copy().unwrap();
        let norm = step(&slots, hyper(1), 1.0).unwrap();
        assert!((norm - exact).abs() < 1e-6 * exact, "{norm} vs {exact}");
        assert!(crate::test_util::max_abs_diff(&a[0], &w0) > 0.0);
        assert_eq!(clip_coefficient(3.0, 0.0), 1.0);
        assert_eq!(clip_coefficient(3.0, 6.0), 1.0);
        assert!((clip_coefficient(3.0, 1.5) - 1.5 / (3.0 + 1e-6)).abs() < 1e-15);
    }

    #[test]
    fn a_non_finite_gradient_changes_nothing() {
        for bad in [f32::INFINITY, f32::NAN] {
            let [w, m, v, _] = slot_tensors(100, DType::F32);
            let mut gv = vec![0.5f32; 100];
            gv[42] = bad;
            let g = Tensor::new(gv, &Device::Cpu).unwrap();
            let before = [&w, &m, &v].map(|t| t.copy().unwrap());
            let slot = Slot {
                w: &w,
                m: &m,
                v: &v,
                g: &g,
                decays: true,
                seeds: [0; 3],
            };
            let norm = step(&[slot], hyper(1), 1.0).unwrap();
            assert!(!norm.is_finite());
            for (t, b) in [&w, &m, &v].iter().zip(&before) {
                assert_eq!(crate::test_util::max_abs_diff(t, b), 0.0, "{bad}");
            }
        }
    }

    #[test]
    fn what_the_8bit_kernel_does_not_cover_is_named() {
        let dev = Device::Cpu;
        let n = 1000; // 4 blocks, the last short
        let w = Tensor::zeros(n, DType::F32, &dev).unwrap();
        let codes = Tensor::zeros(n, DType::U8, &dev).unwrap();
        let absmax = Tensor::zeros(4, DType::F32, &dev).unwrap();
        let tables = Tensor::zeros((2, QBLOCK), DType::F32, &dev).unwrap();
        let wrong_absmax = Tensor::zeros(3, DType::F32, &dev).unwrap();
        let codes_f32 = Tensor::zeros(n, DType::F32, &dev).unwrap();
        let slot = |m_codes, m_absmax| Slot8 {
            w: &w,
            g: &w,
            m_codes,
            m_absmax,
            v_codes: &codes,
            v_absmax: &absmax,
            decays: true,
            seed: 0,
        };
        let why = |s: Slot8<'_>| {
            let slots = [s];
            unsupported_8bit(
                &[],
                &Eight {
                    slots: &slots,
                    maps: &tables,
                    bounds: &tables,
                },
            )
        };
        assert_eq!(why(slot(&codes, &absmax)), None);
        let msg = why(slot(&codes, &wrong_absmax)).unwrap();
        assert!(
            msg.contains("first moment's absmax") && msg.contains("3 values"),
            "{msg}"
        );
        let msg = why(slot(&codes_f32, &absmax)).unwrap();
        assert!(
            msg.contains("first moment's codes") && msg.contains("F32"),
            "{msg}"
        );
    }

    #[test]
    fn what_the_kernels_do_not_cover_is_named() {
        let [w, m, v, g] = slot_tensors(10, DType::F32);
        let g16 = g.to_dtype(DType::BF16).unwrap();
        let wt = Tensor::zeros((2, 5), DType::F32, &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        let slot = |w, g| Slot {
            w,
            m: &m,
            v: &v,
            g,
            decays: false,
            seeds: [0; 3],
        };
        assert_eq!(unsupported(&[slot(&w, &g)]), None);
        let why = unsupported(&[slot(&w, &g16)]).unwrap();
        assert!(why.contains("gradient") && why.contains("BF16"), "{why}");
        let why = unsupported(&[slot(&wt, &g)]).unwrap();
        assert!(why.contains("contiguous"), "{why}");
    }
}

//! The optimizer step over every trainable tensor at once: the gradients' global norm, torch's
//! clipping coefficient and AdamW, on CUDA in three launches whatever the number of tensors
//! (`triton/adamw.py`: `grad_sumsq`, `clip_norm`, `adamw_multi`, committed as cubins), with the
//! norm read back once, after the update is queued. One launch per op and tensor made about
//! six per tensor (a Qwen2-0.5B has 290), and the clipping coefficient a host round trip
//! between the backward and the update.
//!
//! The tensors travel as a table of device addresses, cut in chunks of one tensor each (apex's
//! multi_tensor_apply layout). The CPU computes the same step with the same structure (each
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

/// Why these slots cannot take the step over all tensors at once (None: they can): one device,
/// weights in one dtype and moments and gradients in one state dtype (each f32 or bf16),
/// contiguous, each under 2^31 elements (the kernels' offsets).
pub fn unsupported(slots: &[Slot<'_>]) -> Option<String> {
    let first = slots.first()?;
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
        if s.w.elem_count() > i32::MAX as usize {
            return Some(format!(
                "a tensor of {} elements (over 2^31)",
                s.w.elem_count()
            ));
        }
    }
    None
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
        Device::Cuda(dev) => cuda::step(dev, slots, h, max_norm),
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
mod cuda {
    use super::{Hyper, Slot};
    use crate::model::fused::cubins::launch::{arch, err, kernel, launch, Arg};
    use crate::model::fused::cubins::{Kernel, Want};
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, DType, Result, Storage, StorageRef, Tensor};
    use half::bf16;

    /// `name` for bf16 state and bf16 weights (whichever of the two it takes).
    fn kernel_for(name: &str, arch: u32, bf16: &[(&str, bool)]) -> Result<&'static Kernel> {
        let consts: Vec<(&str, serde_json::Value)> =
            bf16.iter().map(|&(k, b)| (k, b.into())).collect();
        kernel(&Want {
            kernel: name,
            arch,
            types: &[],
            constexprs: &consts,
        })
    }

    /// The device address of element `start` of a tensor's storage.
    fn address<T: CudaDType>(s: &CudaStorage, start: usize, dev: &CudaDevice) -> Result<i64> {
        let stream = dev.cuda_stream();
        let (ptr, _record) = s.as_cuda_slice::<T>()?.device_ptr(&stream);
        Ok((ptr + (start * std::mem::size_of::<T>()) as u64) as i64)
    }

    /// `t`'s address, its storage read-locked in `guards` until the launches are queued.
    fn table_entry<'a>(
        t: &'a Tensor,
        dev: &CudaDevice,
        guards: &mut Vec<StorageRef<'a>>,
    ) -> Result<i64> {
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(s) = &*storage else {
            return Err(err(
                "the optimizer step's tensors are not all on CUDA".into()
            ));
        };
        let (start, _) = layout
            .contiguous_offsets()
            .ok_or_else(|| err("the optimizer step's tensors must be contiguous".into()))?;
        let addr = match t.dtype() {
            DType::F32 => address::<f32>(s, start, dev)?,
            DType::BF16 => address::<bf16>(s, start, dev)?,
            other => return Err(err(format!("the optimizer step takes no {other:?}"))),
        };
        guards.push(storage);
        Ok(addr)
    }

    pub fn step(dev: &CudaDevice, slots: &[Slot<'_>], h: Hyper, max_norm: f64) -> Result<f64> {
        let arch = arch(dev)?;
        let bf16 = slots[0].m.dtype() == DType::BF16;
        let w_bf16 = slots[0].w.dtype() == DType::BF16;
        let sumsq = kernel_for("grad_sumsq", arch, &[("BF16", bf16)])?;
        let clip = kernel_for("clip_norm", arch, &[])?;
        let adamw = kernel_for("adamw_multi", arch, &[("BF16", bf16), ("W_BF16", w_bf16)])?;
        let chunk = adamw
            .tile("CHUNK")
            .filter(|&c| Some(c) == sumsq.tile("CHUNK"))
            .ok_or_else(|| err("grad_sumsq and adamw_multi disagree on CHUNK".into()))?;

        // [w, m, v, g, seed m, seed v, seed w] per tensor (`adamw.PTR_WORDS`);
        // [tensor, start, end, decays] per chunk
        let mut guards = Vec::with_capacity(4 * slots.len());
        let mut ptrs = Vec::with_capacity(7 * slots.len());
        let mut chunks = Vec::new();
        for (t, s) in slots.iter().enumerate() {
            for x in [s.w, s.m, s.v, s.g] {
                ptrs.push(table_entry(x, dev, &mut guards)?);
            }
            ptrs.extend(s.seeds.map(i64::from));
            let n = s.w.elem_count();
            for start in (0..n).step_by(chunk) {
                // under 2^31 each (`unsupported`)
                let end = (start + chunk).min(n);
                chunks.extend([t as i32, start as i32, end as i32, i32::from(s.decays)]);
            }
        }
        let n_chunks = chunks.len() / 4;
        let grid = (
            u32::try_from(n_chunks).map_err(|_| err("too many chunks".into()))?,
            1,
            1,
        );
        // Host-to-device copies from pageable memory are staged and return at once: no wait
        // for the backward still running.
        let stream = dev.cuda_stream();
        let ptrs = stream.clone_htod(&ptrs).w()?;
        let chunks = stream.clone_htod(&chunks).w()?;
        let mut partials = stream.alloc_zeros::<f32>(n_chunks.max(1)).w()?;
        let mut out = stream.alloc_zeros::<f64>(2).w()?;
        {
            let mut pv = partials.slice_mut(..);
            let mut args = [
                Arg::Table(&ptrs),
                Arg::Offsets(&chunks),
                Arg::F32Mut(&mut pv),
            ];
            launch(dev, sumsq, grid, &mut args)?;
        }
        {
            let pv = partials.slice(..);
            let mut args = [
                Arg::F32(&pv),
                Arg::I32(n_chunks as i32),
                Arg::F64Mut(&mut out),
                Arg::Double(max_norm),
            ];
            launch(dev, clip, (1, 1, 1), &mut args)?;
        }
        let f = |x: f64| Arg::Float(x as f32);
        let mut args = [
            Arg::Table(&ptrs),
            Arg::Offsets(&chunks),
            Arg::F64(&out),
            f(h.beta1),
            f(1.0 - h.beta1),
            f(h.beta2),
            f(1.0 - h.beta2),
            f(h.decay),
            f(h.lr_bc1),
            f(h.inv_sqrt_bc2),
            f(h.eps),
        ];
        launch(dev, adamw, grid, &mut args)?;
        drop(guards);
        // The step's one device-to-host copy: [norm, coefficient].
        let host = stream.clone_dtoh(&out).w()?;
        Ok(host[0])
    }
}

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

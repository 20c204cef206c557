//! AdamW in place on one tensor, on the CPU: each moment, then the weights, in loops that compute
//! what `triton/adamw.py`'s `adamw_multi` computes per element, in the same order, which is how
//! the fused update is held to the composed one: bit for bit with f32 moments. On CUDA the step
//! over all tensors at once ([`super::adamw_step`]) launches the kernel instead.
//!
//! A bf16 moment or weight is rounded stochastically (the kernels from a Philox stream, the CPU
//! from splitmix64: the same distribution, other bits), and the weights read the stored moments.

use super::elem::{offsets, slice, unsupported, Elem};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use half::bf16;
use rayon::prelude::*;

const NAME: &str = "adamw";

/// Elements per task when the CPU loops run over its threads.
const PAR_CHUNK: usize = 1 << 16;

/// x ← x·β + (g·grad_scale)[²]·(1 − β), in f32, stored in x's dtype (f32, or bf16 rounded
/// stochastically from `seed`).
#[derive(Debug, Clone, Copy)]
pub struct Moment {
    pub beta: f64,
    pub grad_scale: f64,
    pub seed: u32,
    /// The second moment: the scaled gradient squared.
    pub square: bool,
}

/// w ← w·decay − (m / (√v · inv_sqrt_bc2 + eps)) · lr_bc1, in f32, stored in w's dtype (f32, or
/// bf16 rounded stochastically from `seed`: a DPO step is far below half a bf16 spacing of a
/// weight, which round-to-nearest would drop every time).
#[derive(Debug, Clone, Copy)]
pub struct Weight {
    pub decay: f64,
    /// lr / (1 − β1^t)
    pub lr_bc1: f64,
    /// 1 / √(1 − β2^t)
    pub inv_sqrt_bc2: f64,
    pub eps: f64,
    pub seed: u32,
}

/// Updates the moment `x` in place from the gradient `g` (same shape; `x` contiguous and held by
/// nothing else).
pub fn adamw_moment(x: &Tensor, g: &Tensor, op: Moment) -> Result<()> {
    x.inplace_op2(&g.contiguous()?, &op)
}

/// Updates the weights `w` (f32 or bf16) in place from the moments `m` and `v`.
pub fn adamw_weight(w: &Tensor, m: &Tensor, v: &Tensor, op: Weight) -> Result<()> {
    w.inplace_op3(&m.contiguous()?, &v.contiguous()?, &op)
}

fn same_shape(a: &Layout, b: &Layout) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(candle_core::Error::Msg(format!(
            "fused {NAME}: shapes {:?} and {:?} differ",
            a.dims(),
            b.dims()
        )));
    }
    Ok(())
}

/// The f32 scalars the kernels take, rounded from f64 as candle's affine ops round theirs.
impl Moment {
    fn scalars(&self) -> (f32, f32, f32) {
        (
            self.beta as f32,
            (1.0 - self.beta) as f32,
            self.grad_scale as f32,
        )
    }

    /// Over the CPU's threads, a run of [`PAR_CHUNK`] elements each; `store` gets the element's
    /// index in `x`, so the result does not depend on the split.
    fn cpu<T: Elem, G: Elem>(&self, x: &mut [T], g: &[G], store: impl Fn(f32, usize) -> T + Sync) {
        let (beta, omb, gs) = self.scalars();
        x.par_chunks_mut(PAR_CHUNK)
            .zip(g.par_chunks(PAR_CHUNK))
            .enumerate()
            .for_each(|(k, (x, g))| {
                for (j, (x, g)) in x.iter_mut().zip(g).enumerate() {
                    let g = g.f() * gs;
                    let g = if self.square { g * g } else { g };
                    *x = store(x.f() * beta + g * omb, k * PAR_CHUNK + j);
                }
            });
    }
}

/// bf16 from f32, up with probability equal to the distance from the bf16 value below: 16
/// random low bits added to the bit pattern, then truncated (as the kernel does).
pub fn bf16_stochastic(x: f32, seed: u32, i: usize) -> bf16 {
    let noise = (crate::rng::bits(u64::from(seed), i as u64 + 1) & 0xFFFF) as u32;
    bf16::from_bits((x.to_bits().wrapping_add(noise) >> 16) as u16)
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "refdpo-adamw-moment"
    }

    fn cpu_fwd(&self, x: &mut CpuStorage, xl: &Layout, g: &CpuStorage, gl: &Layout) -> Result<()> {
        same_shape(xl, gl)?;
        let (a, b) = offsets(NAME, xl)?;
        macro_rules! with_grad {
            ($xs:expr, $store:expr) => {
                match g.dtype() {
                    DType::F32 => self.cpu($xs, slice::<f32>(NAME, g, gl)?, $store),
                    DType::BF16 => self.cpu($xs, slice::<bf16>(NAME, g, gl)?, $store),
                    DType::F16 => self.cpu($xs, slice::<half::f16>(NAME, g, gl)?, $store),
                    other => return Err(unsupported(NAME, other)),
                }
            };
        }
        match x {
            CpuStorage::F32(v) => with_grad!(&mut v[a..b], |y, _| y),
            CpuStorage::BF16(v) => {
                with_grad!(&mut v[a..b], |y, i| bf16_stochastic(y, self.seed, i))
            }
            other => return Err(unsupported(NAME, other.dtype())),
        }
        Ok(())
    }
}

impl InplaceOp3 for Weight {
    fn name(&self) -> &'static str {
        "refdpo-adamw-weight"
    }

    fn cpu_fwd(
        &self,
        w: &mut CpuStorage,
        wl: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        same_shape(wl, ml)?;
        same_shape(wl, vl)?;
        let (a, b) = offsets(NAME, wl)?;
        macro_rules! with_moments {
            ($ws:expr, $store:expr) => {
                match (m.dtype(), v.dtype()) {
                    (DType::F32, DType::F32) => self.cpu(
                        $ws,
                        slice::<f32>(NAME, m, ml)?,
                        slice::<f32>(NAME, v, vl)?,
                        $store,
                    ),
                    (DType::BF16, DType::BF16) => self.cpu(
                        $ws,
                        slice::<bf16>(NAME, m, ml)?,
                        slice::<bf16>(NAME, v, vl)?,
                        $store,
                    ),
                    (other, _) => return Err(unsupported(NAME, other)),
                }
            };
        }
        match w {
            CpuStorage::F32(w) => with_moments!(&mut w[a..b], |y, _| y),
            CpuStorage::BF16(w) => {
                with_moments!(&mut w[a..b], |y, i| bf16_stochastic(y, self.seed, i))
            }
            other => return Err(unsupported(NAME, other.dtype())),
        }
        Ok(())
    }
}

impl Weight {
    fn scalars(&self) -> (f32, f32, f32, f32) {
        (
            self.decay as f32,
            self.lr_bc1 as f32,
            self.inv_sqrt_bc2 as f32,
            self.eps as f32,
        )
    }

    /// Over the CPU's threads as [`Moment::cpu`]; `store` gets the element's index in `w`.
    fn cpu<W: Elem, T: Elem>(
        &self,
        w: &mut [W],
        m: &[T],
        v: &[T],
        store: impl Fn(f32, usize) -> W + Sync,
    ) {
        let (decay, lr_bc1, isb, eps) = self.scalars();
        w.par_chunks_mut(PAR_CHUNK)
            .zip(m.par_chunks(PAR_CHUNK).zip(v.par_chunks(PAR_CHUNK)))
            .enumerate()
            .for_each(|(k, (w, (m, v)))| {
                for (j, ((w, m), v)) in w.iter_mut().zip(m).zip(v).enumerate() {
                    let denom = v.f().sqrt() * isb + eps;
                    *w = store(w.f() * decay - (m.f() / denom) * lr_bc1, k * PAR_CHUNK + j);
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn stochastic_rounding_picks_a_neighbour_in_proportion() {
        // 1 + 2^-10 is an eighth of the way from 1 to the next bf16 (1 + 2^-7)
        let x = 1.0f32 + 2f32.powi(-10);
        let n = 100_000;
        let up = (0..n)
            .map(|i| bf16_stochastic(x, 7, i).to_f32())
            .inspect(|&r| assert!(r == 1.0 || r == 1.0 + 2f32.powi(-7), "{r}"))
            .filter(|&r| r > 1.0)
            .count();
        let frac = up as f64 / n as f64;
        assert!((frac - 0.125).abs() < 0.005, "{frac}");
        for exact in [0.0f32, -2.5, 3.0, 1.5] {
            assert_eq!(bf16_stochastic(exact, 7, 3).to_f32(), exact);
        }
    }

    #[test]
    fn shapes_and_dtypes_are_checked() {
        let dev = Device::Cpu;
        let m = Tensor::zeros(4, DType::F32, &dev).unwrap();
        let g = Tensor::zeros(5, DType::F32, &dev).unwrap();
        let op = Moment {
            beta: 0.9,
            grad_scale: 1.0,
            seed: 0,
            square: false,
        };
        let e = adamw_moment(&m, &g, op).unwrap_err().to_string();
        assert!(e.contains("adamw") && e.contains("differ"), "{e}");
        let w = Tensor::zeros(4, DType::F16, &dev).unwrap();
        let op = Weight {
            decay: 1.0,
            lr_bc1: 1e-3,
            inv_sqrt_bc2: 1.0,
            eps: 1e-8,
            seed: 0,
        };
        assert!(adamw_weight(&w, &m, &m, op).is_err());
        let w = Tensor::zeros(5, DType::BF16, &dev).unwrap();
        let e = adamw_weight(&w, &m, &m, op).unwrap_err().to_string();
        assert!(e.contains("differ"), "{e}");
    }
}

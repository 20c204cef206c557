//! AdamW in place: each moment in one launch and the weights in one more (the Triton kernels of
//! `triton/adamw.py`, committed as cubins), where the composed update makes a dozen ops and
//! three copies per tensor. The CPU computes the same in loops, in the same order, which is how
//! the fused update is held to the composed one: bit for bit with f32 moments.
//!
//! A bf16 moment is rounded stochastically (the kernels from a Philox stream, the CPU from
//! splitmix64: the same distribution, other bits), and the weights read the stored moments.

use super::elem::{offsets, slice, unsupported, Elem};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use half::bf16;

const NAME: &str = "adamw";

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

/// w ← w·decay − (m / (√v · inv_sqrt_bc2 + eps)) · lr_bc1, in f32.
#[derive(Debug, Clone, Copy)]
pub struct Weight {
    pub decay: f64,
    /// lr / (1 − β1^t)
    pub lr_bc1: f64,
    /// 1 / √(1 − β2^t)
    pub inv_sqrt_bc2: f64,
    pub eps: f64,
}

/// Updates the moment `x` in place from the gradient `g` (same shape; `x` contiguous and held by
/// nothing else).
pub fn adamw_moment(x: &Tensor, g: &Tensor, op: Moment) -> Result<()> {
    x.inplace_op2(&g.contiguous()?, &op)
}

/// Updates the f32 weights `w` in place from the moments `m` and `v`.
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

    fn cpu<T: Elem, G: Elem>(&self, x: &mut [T], g: &[G], store: impl Fn(f32, usize) -> T) {
        let (beta, omb, gs) = self.scalars();
        for (i, (x, g)) in x.iter_mut().zip(g).enumerate() {
            let g = g.f() * gs;
            let g = if self.square { g * g } else { g };
            *x = store(x.f() * beta + g * omb, i);
        }
    }
}

/// bf16 from f32, up with probability equal to the distance from the bf16 value below: 16
/// random low bits added to the bit pattern, then truncated (as the kernel does).
fn bf16_stochastic(x: f32, seed: u32, i: usize) -> bf16 {
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &mut candle_core::CudaStorage,
        xl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<()> {
        same_shape(xl, gl)?;
        cuda::moment(self, x, xl, g, gl)
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
        let CpuStorage::F32(w) = w else {
            return Err(unsupported(NAME, w.dtype()));
        };
        match (m.dtype(), v.dtype()) {
            (DType::F32, DType::F32) => self.cpu(
                &mut w[a..b],
                slice::<f32>(NAME, m, ml)?,
                slice::<f32>(NAME, v, vl)?,
            ),
            (DType::BF16, DType::BF16) => self.cpu(
                &mut w[a..b],
                slice::<bf16>(NAME, m, ml)?,
                slice::<bf16>(NAME, v, vl)?,
            ),
            (other, _) => return Err(unsupported(NAME, other)),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        w: &mut candle_core::CudaStorage,
        wl: &Layout,
        m: &candle_core::CudaStorage,
        ml: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<()> {
        same_shape(wl, ml)?;
        same_shape(wl, vl)?;
        cuda::weight(self, w, wl, m, ml, v, vl)
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

    fn cpu<T: Elem>(&self, w: &mut [f32], m: &[T], v: &[T]) {
        let (decay, lr_bc1, isb, eps) = self.scalars();
        for ((w, m), v) in w.iter_mut().zip(m).zip(v) {
            let denom = v.f().sqrt() * isb + eps;
            *w = *w * decay - (m.f() / denom) * lr_bc1;
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{Moment, Weight, NAME};
    use crate::model::fused::cubins::launch::{
        arch, err, i32_of, kernel, launch, view, view_mut, Arg, KernelElem,
    };
    use crate::model::fused::cubins::{dtype_name, Want};
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, DType, Layout, Result};
    use half::{bf16, f16};

    /// The kernels' block: elements per program (compile.py).
    fn grid(k: &crate::model::fused::cubins::Kernel, n: usize) -> Result<(u32, u32, u32)> {
        let block = k
            .tile("BLOCK")
            .ok_or_else(|| err(format!("{}: no BLOCK", k.name)))?;
        Ok((i32_of("blocks", n.div_ceil(block))? as u32, 1, 1))
    }

    fn ptr_type(dtype: DType) -> Result<String> {
        dtype_name(dtype)
            .map(|d| format!("*{d}"))
            .ok_or_else(|| err(format!("fused {NAME}: {dtype:?}")))
    }

    pub fn moment(
        op: &Moment,
        x: &mut CudaStorage,
        xl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> Result<()> {
        match (x.dtype(), g.dtype()) {
            (DType::F32, DType::F32) => moment_t::<f32, f32>(op, x, xl, g, gl),
            (DType::F32, DType::BF16) => moment_t::<f32, bf16>(op, x, xl, g, gl),
            (DType::F32, DType::F16) => moment_t::<f32, f16>(op, x, xl, g, gl),
            (DType::BF16, DType::F32) => moment_t::<bf16, f32>(op, x, xl, g, gl),
            (DType::BF16, DType::BF16) => moment_t::<bf16, bf16>(op, x, xl, g, gl),
            (DType::BF16, DType::F16) => moment_t::<bf16, f16>(op, x, xl, g, gl),
            (x, g) => Err(err(format!("fused {NAME}: moments {x:?}, gradients {g:?}"))),
        }
    }

    fn moment_t<X: KernelElem, G: KernelElem>(
        op: &Moment,
        x: &mut CudaStorage,
        xl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> Result<()> {
        let n = xl.shape().elem_count();
        let dev = x.device.clone();
        let (tx, tg) = (ptr_type(x.dtype())?, ptr_type(g.dtype())?);
        let k = kernel(&Want {
            kernel: "adamw_moment",
            arch: arch(&dev)?,
            types: &[(0, &tx), (1, &tg)],
            constexprs: &[("SQUARE", op.square.into())],
        })?;
        let (beta, omb, gs) = op.scalars();
        let gv = view::<G>(g, gl)?;
        let mut xv = view_mut::<X>(x, xl)?;
        let mut args = vec![
            X::arg_mut(&mut xv),
            G::arg(&gv),
            Arg::I32(i32_of("elements", n)?),
            Arg::Float(beta),
            Arg::Float(omb),
            Arg::Float(gs),
            Arg::I32(op.seed as i32),
        ];
        launch(&dev, k, grid(k, n)?, &mut args)
    }

    pub fn weight(
        op: &Weight,
        w: &mut CudaStorage,
        wl: &Layout,
        m: &CudaStorage,
        ml: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<()> {
        match (w.dtype(), m.dtype(), v.dtype()) {
            (DType::F32, DType::F32, DType::F32) => weight_t::<f32>(op, w, wl, m, ml, v, vl),
            (DType::F32, DType::BF16, DType::BF16) => weight_t::<bf16>(op, w, wl, m, ml, v, vl),
            (w, m, v) => Err(err(format!(
                "fused {NAME}: weights {w:?}, moments {m:?}/{v:?}"
            ))),
        }
    }

    fn weight_t<S: KernelElem>(
        op: &Weight,
        w: &mut CudaStorage,
        wl: &Layout,
        m: &CudaStorage,
        ml: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<()> {
        let n = wl.shape().elem_count();
        let dev = w.device.clone();
        let ts = ptr_type(m.dtype())?;
        let k = kernel(&Want {
            kernel: "adamw_weight",
            arch: arch(&dev)?,
            types: &[(0, "*fp32"), (1, &ts)],
            constexprs: &[],
        })?;
        let (decay, lr_bc1, isb, eps) = op.scalars();
        let (mv, vv) = (view::<S>(m, ml)?, view::<S>(v, vl)?);
        let mut wv = view_mut::<f32>(w, wl)?;
        let mut args = vec![
            Arg::F32Mut(&mut wv),
            S::arg(&mv),
            S::arg(&vv),
            Arg::I32(i32_of("elements", n)?),
            Arg::Float(decay),
            Arg::Float(lr_bc1),
            Arg::Float(isb),
            Arg::Float(eps),
        ];
        launch(&dev, k, grid(k, n)?, &mut args)
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
        let w = Tensor::zeros(4, DType::BF16, &dev).unwrap();
        let op = Weight {
            decay: 1.0,
            lr_bc1: 1e-3,
            inv_sqrt_bc2: 1.0,
            eps: 1e-8,
        };
        assert!(adamw_weight(&w, &m, &m, op).is_err());
    }
}

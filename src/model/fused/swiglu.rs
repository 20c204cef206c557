//! SwiGLU, silu(gate) · up, forward and backward each as one elementwise kernel.

use super::elem::{round, slice, with_float, Elem};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType};

const NAME: &str = "swiglu";

/// silu(gate) rounded to the compute dtype (transformers' activation output), times up.
#[derive(Debug, Clone, Copy)]
pub struct Swiglu;

fn silu(a: f32) -> f32 {
    a / (1.0 + (-a).exp())
}

fn forward<T: Elem>(gate: &[T], up: &[T]) -> Vec<T> {
    gate.iter()
        .zip(up)
        .map(|(g, u)| T::of(round::<T>(silu(g.f())) * u.f()))
        .collect()
}

/// [2, n]: d gate, then d up.
fn backward<T: Elem>(gate: &[T], up: &[T], dy: &[T]) -> Vec<T> {
    let n = gate.len();
    let mut out = vec![T::zero(); 2 * n];
    let (dg, du) = out.split_at_mut(n);
    for i in 0..n {
        let (a, d) = (gate[i].f(), dy[i].f());
        let sig = 1.0 / (1.0 + (-a).exp());
        dg[i] = T::of(d * up[i].f() * sig * (1.0 + a * (1.0 - sig)));
        du[i] = T::of(d * round::<T>(silu(a)));
    }
    out
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "refdpo-swiglu"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        with_float!(g.dtype(), NAME, T => {
            let y = forward(slice::<T>(NAME, g, gl)?, slice::<T>(NAME, u, ul)?);
            Ok((T::to_cpu_storage_owned(y), gl.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        u: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::launch::{count, elementwise, launch, view};
        let n = gl.shape().elem_count();
        let nu = count(NAME, n)?;
        let dev = &g.device;
        let kernel = format!("swiglu_fwd_{}", g.dtype().as_str());
        with_float!(g.dtype(), NAME, T => {
            let (gv, uv) = (view::<T>(NAME, g, gl)?, view::<T>(NAME, u, ul)?);
            let y = launch!(dev, kernel, elementwise(n), y: T = n; &gv, &uv, &y, &nu);
            Ok((candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone()), gl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let out = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SwigluBackward)?;
        Ok((Some(out.get(0)?), Some(out.get(1)?)))
    }
}

/// (gate, up, dy) → [2, ..] (d gate, d up).
#[derive(Debug, Clone, Copy)]
struct SwigluBackward;

fn pair_shape(layout: &Layout) -> Shape {
    let mut dims = vec![2];
    dims.extend_from_slice(layout.dims());
    Shape::from(dims)
}

impl CustomOp3 for SwigluBackward {
    fn name(&self) -> &'static str {
        "refdpo-swiglu-bwd"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
        d: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        with_float!(g.dtype(), NAME, T => {
            let out = backward(
                slice::<T>(NAME, g, gl)?,
                slice::<T>(NAME, u, ul)?,
                slice::<T>(NAME, d, dl)?,
            );
            Ok((T::to_cpu_storage_owned(out), pair_shape(gl)))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        u: &candle_core::CudaStorage,
        ul: &Layout,
        d: &candle_core::CudaStorage,
        dl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::launch::{count, elementwise, launch, view};
        let n = gl.shape().elem_count();
        count(NAME, 2 * n)?;
        let nu = n as u32;
        let dev = &g.device;
        let kernel = format!("swiglu_bwd_{}", g.dtype().as_str());
        with_float!(g.dtype(), NAME, T => {
            let (gv, uv, dv) = (
                view::<T>(NAME, g, gl)?,
                view::<T>(NAME, u, ul)?,
                view::<T>(NAME, d, dl)?,
            );
            let out = launch!(dev, kernel, elementwise(n), out: T = 2 * n; &gv, &uv, &dv, &out, &nu);
            Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()), pair_shape(gl)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;
    use candle_core::{Device, Var};

    #[test]
    fn forward_and_backward_equal_the_composed_ops() {
        let dev = Device::Cpu;
        let g = Var::from_tensor(&Tensor::randn(0f32, 3.0, (3, 7), &dev).unwrap()).unwrap();
        let u = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 7), &dev).unwrap()).unwrap();
        let up = Tensor::randn(0f32, 1.0, (3, 7), &dev).unwrap();
        let want = (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap();
        let got = g.as_tensor().apply_op2(u.as_tensor(), Swiglu).unwrap();
        assert!(max_abs_diff(&want, &got) < 1e-6);
        let gw = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gg = (got * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&g, &u] {
            let d = max_abs_diff(
                gw.get(v.as_tensor()).unwrap(),
                gg.get(v.as_tensor()).unwrap(),
            );
            assert!(d < 1e-5, "{d}");
        }
    }
}

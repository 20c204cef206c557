//! RoPE in transformers' rotate-half form as one kernel; its backward is the same kernel with
//! −sin (the rotation's inverse).

use super::elem::{round, slice, with_float, Elem};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType};

const NAME: &str = "rope";

/// x [b, heads, t, d], cos and sin [t, d/2] (the activations' dtype) → x rotated by `sign`·θ.
#[derive(Debug, Clone, Copy)]
pub struct RopeOp {
    pub sign: f32,
}

impl RopeOp {
    fn forward<T: Elem>(&self, x: &[T], cos: &[T], sin: &[T], t: usize, half: usize) -> Vec<T> {
        let mut y = vec![T::zero(); x.len()];
        for (row, (xr, yr)) in x.chunks(2 * half).zip(y.chunks_mut(2 * half)).enumerate() {
            let tab = (row % t) * half;
            for k in 0..half {
                let (x1, x2) = (xr[k].f(), xr[half + k].f());
                let (c, s) = (cos[tab + k].f(), self.sign * sin[tab + k].f());
                yr[k] = T::of(round::<T>(x1 * c) - round::<T>(x2 * s));
                yr[half + k] = T::of(round::<T>(x2 * c) + round::<T>(x1 * s));
            }
        }
        y
    }
}

/// (t, d/2) of x's layout [.., t, d].
fn dims(layout: &Layout) -> Result<(usize, usize)> {
    let d = layout.dims();
    if d.len() < 2 || !d[d.len() - 1].is_multiple_of(2) {
        return Err(candle_core::Error::Msg(format!(
            "fused {NAME}: expected [.., t, even head_dim], got {d:?}"
        )));
    }
    Ok((d[d.len() - 2].max(1), d[d.len() - 1] / 2))
}

impl CustomOp3 for RopeOp {
    fn name(&self) -> &'static str {
        "refdpo-rope"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        cos: &CpuStorage,
        cl: &Layout,
        sin: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (t, half) = dims(xl)?;
        with_float!(x.dtype(), NAME, T => {
            let y = self.forward(
                slice::<T>(NAME, x, xl)?,
                slice::<T>(NAME, cos, cl)?,
                slice::<T>(NAME, sin, sl)?,
                t,
                half,
            );
            Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        cos: &candle_core::CudaStorage,
        cl: &Layout,
        sin: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::launch::{count, elementwise, launch, view};
        let n = xl.shape().elem_count();
        count(NAME, n)?;
        let (t, half) = dims(xl)?;
        let (pairs, tu, hu) = ((n / 2) as u32, t as u32, half as u32);
        let dev = &x.device;
        let kernel = format!("rope_{}", x.dtype().as_str());
        with_float!(x.dtype(), NAME, T => {
            let (xv, cv, sv) = (
                view::<T>(NAME, x, xl)?,
                view::<T>(NAME, cos, cl)?,
                view::<T>(NAME, sin, sl)?,
            );
            let y = launch!(dev, kernel, elementwise(n / 2), y: T = n;
                &xv, &cv, &sv, &y, &pairs, &tu, &hu, &self.sign);
            Ok((candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone()), xl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let back = RopeOp { sign: -self.sign };
        let dx = grad.contiguous()?.apply_op3_no_bwd(cos, sin, &back)?;
        Ok((Some(dx), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;
    use candle_core::{DType, Device, Var};

    #[test]
    fn forward_and_backward_equal_the_composed_ops() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap()).unwrap();
        let theta = Tensor::randn(0f32, 2.0, (5, 4), &dev).unwrap();
        let (cos, sin) = (theta.cos().unwrap(), theta.sin().unwrap());
        let up = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap();
        let want = candle_nn::rotary_emb::rope_slow(x.as_tensor(), &cos, &sin).unwrap();
        let got = x
            .as_tensor()
            .apply_op3(&cos, &sin, RopeOp { sign: 1.0 })
            .unwrap();
        assert!(max_abs_diff(&want, &got) < 1e-6);
        let gw = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gg = (got * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let d = max_abs_diff(
            gw.get(x.as_tensor()).unwrap(),
            gg.get(x.as_tensor()).unwrap(),
        );
        assert!(d < 1e-6, "{d}");
    }

    #[test]
    fn bf16_equals_the_composed_ops_exactly() {
        // transformers rounds each product and sum in bf16, as the composed ops do
        let dev = Device::Cpu;
        let bf = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
        let x = bf(Tensor::randn(0f32, 1.0, (1, 2, 6, 8), &dev).unwrap());
        let theta = Tensor::randn(0f32, 2.0, (6, 4), &dev).unwrap();
        let (cos, sin) = (bf(theta.cos().unwrap()), bf(theta.sin().unwrap()));
        let want = candle_nn::rotary_emb::rope_slow(&x, &cos, &sin).unwrap();
        let got = x.apply_op3(&cos, &sin, RopeOp { sign: 1.0 }).unwrap();
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        assert_eq!(max_abs_diff(&f32(&want), &f32(&got)), 0.0);
    }
}

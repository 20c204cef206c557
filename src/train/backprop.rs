//! The start of a backward from an upstream gradient: candle's `backward()` starts from a
//! scalar, so Σ out·g is that scalar. As one graph node ([`Seed`]) whose backward hands `out` the
//! gradient `g` itself, where `(out * g).sum_all()` took a product, a sum and, for `g` too, a
//! gradient (candle's `Mul` backward computes both sides): three full-size ops and a buffer per
//! block backward saved.

use crate::error::Result;
use crate::profile::{self, Phase};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

/// Gradients of Σ out·g (g: the upstream gradient of `out`, its shape and dtype) for every
/// tracked tensor `out` depends on.
pub fn backprop(out: &Tensor, g: &Tensor) -> Result<GradStore> {
    let _phase = profile::scope(Phase::Backward);
    if g.dims() != out.dims() || g.dtype() != out.dtype() {
        return Err(candle_core::Error::Msg(format!(
            "backward seed: gradient {:?} {:?} for an output {:?} {:?}",
            g.dtype(),
            g.dims(),
            out.dtype(),
            out.dims()
        ))
        .into());
    }
    Ok(out.apply_op1(Seed(g.clone()))?.backward()?)
}

/// A scalar node over `out` whose value is never read (0) and whose backward gives `out` the
/// held gradient, whatever reaches it (the root's own gradient, 1).
struct Seed(Tensor);

impl CustomOp1 for Seed {
    fn name(&self) -> &'static str {
        "backward-seed"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        let zero = s
            .device()
            .zeros_impl(&Shape::from(()), candle_core::DType::F32)?;
        Ok((zero, Shape::from(())))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        _grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.0.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The seeded backward gives every tracked tensor the gradient `(out * g).sum_all()` gives.
    #[test]
    fn the_seed_gives_the_gradients_of_the_weighted_sum() {
        let dev = Device::Cpu;
        let w = Var::randn(0f32, 1., (3, 4), &dev).unwrap();
        let x = Tensor::randn(0f32, 1., (5, 3), &dev).unwrap();
        let out = x.matmul(w.as_tensor()).unwrap().tanh().unwrap(); // [5, 4]
        let g = Tensor::randn(0f32, 1., (5, 4), &dev).unwrap();
        let want = (&out * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let got = backprop(&out, &g).unwrap();
        let (a, b) = (want.get(&w).unwrap(), got.get(&w).unwrap());
        let diff = crate::test_util::max_abs_diff(a, b);
        assert_eq!(diff, 0.0);
        assert!(backprop(&out, &g.t().unwrap()).is_err());
    }

    /// candle's backward as refdpo patches it (`vendor/candle-core/PATCH.md`) stores the first
    /// gradient reaching a tensor as it came, with no tensor of zeros added into: through
    /// out = x + z, x's gradient is the seed's own storage, so a change made to the seed in place
    /// shows in it (a sum made from zeros would not change).
    #[test]
    fn the_first_gradient_is_stored_not_added_into_zeros() {
        let dev = Device::Cpu;
        let (x, z) = (
            Var::zeros((2, 3), candle_core::DType::F32, &dev).unwrap(),
            Var::zeros((2, 3), candle_core::DType::F32, &dev).unwrap(),
        );
        let out = (x.as_tensor() + z.as_tensor()).unwrap();
        let g = Tensor::ones((2, 3), candle_core::DType::F32, &dev).unwrap();
        let store = backprop(&out, &g).unwrap();
        crate::model::fused::accumulate(&g, &g.ones_like().unwrap()).unwrap();
        for v in [&x, &z] {
            let got = store.get(v.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(got, vec![vec![2f32; 3]; 2]);
        }
        // a tensor reached twice still gets the sum: d(x + x)/dx = 2g
        let twice = (x.as_tensor() + x.as_tensor()).unwrap();
        let store = backprop(&twice, &g).unwrap();
        let got = store.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(got, vec![vec![4f32; 3]; 2]);
    }
}

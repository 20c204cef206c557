//! x·Wᵀ as one graph node, with the backward written out: the projections of a training
//! forward.
//!
//! candle-nn's `Linear` is three nodes around the product (x reshaped to rows, Wᵀ as a transposed
//! view, the product reshaped back), and candle's backward gives each node a zero tensor and an
//! add for its first gradient: per projection, three fills and three adds of activation or
//! weight size, one of them a strided copy of Wᵀ's gradient. [`LinearOp`] is one node whose
//! backward is dx = dy·W and dW = dyᵀ·x, each written once.
//!
//! candle's matmul backward also computes both operands' gradients whatever they track: under
//! LoRA every frozen base projection's backward made a full weight gradient (the forward's FLOPs
//! again) only for the trainer to drop it. [`FrozenMatmul`] takes the weight as a captured
//! constant, so candle sees x alone: the backward is dy·W.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Storage, Tensor};

/// y = x·Wᵀ for x [.., in] and W [out, in] in one graph node: with [`FrozenMatmul`] where W
/// tracks no gradient, else with [`LinearOp`].
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.track_op() {
        x.contiguous()?.apply_op2(w, LinearOp)
    } else {
        FrozenMatmul::apply(x, w)
    }
}

/// (m, k, n) and the output shape for a contiguous x of `layout` against W [n, k].
fn dims(w: &[usize], layout: &Layout) -> Result<(usize, usize, usize, Shape)> {
    let &[n, k] = w else {
        candle_core::bail!("linear: weight {w:?} is not a matrix")
    };
    let dims = layout.dims();
    if dims.last() != Some(&k) || !layout.is_contiguous() {
        candle_core::bail!(
            "linear: input {dims:?} (contiguous: {}) against weight [{n}, {k}]",
            layout.is_contiguous()
        );
    }
    let mut out = dims.to_vec();
    *out.last_mut().expect("checked above") = n;
    Ok((layout.shape().elem_count() / k, k, n, Shape::from(out)))
}

/// x·Wᵀ on one backend: x as [m, k] rows, W [n, k] (rows contiguous, any offset) read as its
/// transpose [k, n].
fn matmul<S: BackendStorage>(x: &S, xl: &Layout, w: &S, wl: &Layout) -> Result<(S, Shape)> {
    let (m, k, n, shape) = dims(wl.dims(), xl)?;
    let xl = Layout::contiguous_with_offset((m, k), xl.start_offset());
    Ok((x.matmul(w, (1, m, n, k), &xl, &wl.transpose(0, 1)?)?, shape))
}

/// The backward's products for dy of y = x·Wᵀ: dx = dy·W (x's shape) and, when wanted,
/// dW = dyᵀ·x [n, k].
fn grads(x: &Tensor, w: &Tensor, dy: &Tensor, weight: bool) -> Result<(Tensor, Option<Tensor>)> {
    let (n, k) = w.dims2()?;
    let m = dy.elem_count() / n;
    let dy = dy.reshape((m, n))?;
    let dx = dy.matmul(&w.contiguous()?)?.reshape(x.shape())?;
    let dw = if weight {
        Some(dy.t()?.matmul(&x.reshape((m, k))?)?)
    } else {
        None
    };
    Ok((dx, dw))
}

/// x·Wᵀ with both operands in the graph.
#[derive(Debug, Clone, Copy)]
pub struct LinearOp;

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "refdpo-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        matmul(x, xl, w, wl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        matmul(x, xl, w, wl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = grads(x, w, dy, true)?;
        Ok((Some(dx), dw))
    }
}

/// x [.., in] · Wᵀ for W [out, in], W outside the graph.
#[derive(Debug, Clone)]
pub struct FrozenMatmul {
    w: Tensor,
}

impl FrozenMatmul {
    /// y = x·Wᵀ (x's dtype and device, W's too); W must not track gradients.
    pub fn apply(x: &Tensor, w: &Tensor) -> Result<Tensor> {
        debug_assert!(!w.track_op(), "a frozen weight tracks gradients");
        x.contiguous()?.apply_op1(Self { w: w.clone() })
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "refdpo-frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        let Storage::Cpu(w) = &*ws else {
            candle_core::bail!("frozen linear: the weight is not on the CPU")
        };
        matmul(x, xl, w, wl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        let Storage::Cuda(w) = &*ws else {
            candle_core::bail!("frozen linear: the weight is not on CUDA")
        };
        matmul(x, xl, w, wl)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grads(x, &self.w, dy, false)?.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;
    use candle_core::{backprop::GradStore, DType, Device, Var};

    /// A gradient the weight's size in `store` (either orientation).
    fn weight_sized(store: &GradStore) -> bool {
        store.get_ids().any(|id| {
            let dims = store.get_id(*id).unwrap().dims().to_vec();
            dims.ends_with(&[6, 5]) || dims.ends_with(&[5, 6])
        })
    }

    /// A narrowed weight (a fused projection's part: an offset and a row stride), x and an
    /// upstream gradient.
    fn inputs(dev: &Device) -> (Tensor, Var, Tensor) {
        let fused = Tensor::randn(0f32, 1.0, (11, 6), dev).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 6), dev).unwrap()).unwrap();
        let g = Tensor::randn(0f32, 1.0, (2, 3, 5), dev).unwrap();
        (fused, x, g)
    }

    fn loss(y: &Tensor, g: &Tensor) -> GradStore {
        (y * g).unwrap().sum_all().unwrap().backward().unwrap()
    }

    /// Output and input gradient equal candle's matmul, and the weight gets no gradient.
    #[test]
    fn the_frozen_op_equals_the_matmul_and_leaves_the_weight_alone() {
        let dev = Device::Cpu;
        let (fused, x, g) = inputs(&dev);
        let w = fused.narrow(0, 4, 5).unwrap();
        let composed = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        let frozen = linear(x.as_tensor(), &w).unwrap();
        assert_eq!(frozen.dims(), &[2, 3, 5]);
        assert!(max_abs_diff(&frozen, &composed) < 1e-6);
        let (want, got) = (loss(&composed, &g), loss(&frozen, &g));
        assert!(max_abs_diff(got.get(&x).unwrap(), want.get(&x).unwrap()) < 1e-5);
        assert!(
            weight_sized(&want),
            "candle's matmul computes the weight's gradient"
        );
        assert!(!weight_sized(&got), "the frozen op made a weight gradient");
        let bad = Tensor::zeros((2, 3, 4), DType::F32, &dev).unwrap();
        assert!(FrozenMatmul::apply(&bad, &w).is_err());
    }

    /// With a tracked weight: output, dx and dW equal candle's `Linear` (three nodes), from a
    /// narrowed weight and from a non-contiguous x; one node in the graph.
    #[test]
    fn the_trained_op_equals_candle_linear_forward_and_backward() {
        use candle_core::Module;
        let dev = Device::Cpu;
        let (fused, x, g) = inputs(&dev);
        let fused = Var::from_tensor(&fused).unwrap();
        let w = fused.narrow(0, 4, 5).unwrap();
        let want_y = candle_nn::Linear::new(w.clone(), None)
            .forward(x.as_tensor())
            .unwrap();
        let got_y = linear(x.as_tensor(), &w).unwrap();
        assert!(max_abs_diff(&got_y, &want_y) < 1e-5);
        let (want, got) = (loss(&want_y, &g), loss(&got_y, &g));
        for t in [x.as_tensor(), fused.as_tensor()] {
            let (a, b) = (got.get(t).unwrap(), want.get(t).unwrap());
            assert!(max_abs_diff(a, b) < 1e-5, "{:?}", t.dims());
        }
        // the weight's gradient reaches only its rows of the fused tensor
        let dw = got.get(fused.as_tensor()).unwrap();
        let others = dw.narrow(0, 0, 4).unwrap();
        assert_eq!(max_abs_diff(&others, &others.zeros_like().unwrap()), 0.0);
        // one node for the product: no reshapes or transpose around it as candle's `Linear`
        let nodes = |y: &Tensor| y.sorted_nodes().len();
        assert_eq!(nodes(&want_y) - nodes(&got_y), 3);
        // x transposed (not contiguous): the op copies it first
        let xt = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 6, 3), &dev).unwrap()).unwrap();
        let xt_view = xt.transpose(1, 2).unwrap();
        let want_y = xt_view.broadcast_matmul(&w.t().unwrap()).unwrap();
        let got_y = linear(&xt_view, &w).unwrap();
        // another product order than broadcast_matmul's: a few ulps of the random values
        assert!(max_abs_diff(&got_y, &want_y) < 1e-5);
        let (want, got) = (loss(&want_y, &g), loss(&got_y, &g));
        let (a, b) = (got.get(&xt).unwrap(), want.get(&xt).unwrap());
        assert!(max_abs_diff(a, b) < 1e-5);
    }
}

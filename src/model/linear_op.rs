//! x·Wᵀ over a frozen weight, whose backward computes the input's gradient alone.
//!
//! candle's matmul backward computes both operands' gradients whatever they track: under LoRA
//! every base projection's backward made a full weight gradient (the forward's FLOPs again, a
//! zero tensor of the weight's size and an add) only for the trainer to drop it. This op takes
//! the weight as a captured constant, so candle sees x alone: the backward is dy·W.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

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

    /// (m, k, n) and the output shape for x of `layout`, checked against W.
    fn dims(&self, layout: &Layout) -> Result<(usize, usize, usize, Shape)> {
        let (n, k) = self.w.dims2()?;
        let dims = layout.dims();
        if dims.last() != Some(&k) || !layout.is_contiguous() {
            candle_core::bail!(
                "frozen linear: input {dims:?} (contiguous: {}) against weight [{n}, {k}]",
                layout.is_contiguous()
            );
        }
        let mut out = dims.to_vec();
        *out.last_mut().expect("checked above") = n;
        Ok((layout.shape().elem_count() / k, k, n, Shape::from(out)))
    }

    /// x·Wᵀ on one backend: x as [m, k] rows, W's storage (`pick` finds it on this backend,
    /// else `device` names the mismatch) as its transpose [k, n].
    fn matmul<S: BackendStorage>(
        &self,
        x: &S,
        xl: &Layout,
        pick: fn(&Storage) -> Option<&S>,
        device: &str,
    ) -> Result<(S, Shape)> {
        let (m, k, n, shape) = self.dims(xl)?;
        let (ws, wl) = self.w.storage_and_layout();
        let Some(w) = pick(&ws) else {
            candle_core::bail!("frozen linear: the weight is not on {device}")
        };
        let xl = Layout::contiguous_with_offset((m, k), xl.start_offset());
        Ok((x.matmul(w, (1, m, n, k), &xl, &wl.transpose(0, 1)?)?, shape))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "refdpo-frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        fn pick(s: &Storage) -> Option<&CpuStorage> {
            match s {
                Storage::Cpu(w) => Some(w),
                _ => None,
            }
        }
        self.matmul(x, xl, pick, "the CPU")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        fn pick(s: &Storage) -> Option<&candle_core::CudaStorage> {
            match s {
                Storage::Cuda(w) => Some(w),
                _ => None,
            }
        }
        self.matmul(x, xl, pick, "CUDA")
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(dy.broadcast_matmul(&self.w)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Output and input gradient equal candle's matmul, and the weight gets no gradient.
    #[test]
    fn equals_the_matmul_and_leaves_the_weight_alone() {
        let dev = Device::Cpu;
        // a narrowed weight (a fused projection's part): an offset and a row stride
        let fused = Tensor::randn(0f32, 1.0, (11, 6), &dev).unwrap();
        let w = fused.narrow(0, 4, 5).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 6), &dev).unwrap()).unwrap();
        let g = Tensor::randn(0f32, 1.0, (2, 3, 5), &dev).unwrap();
        let composed = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        let frozen = FrozenMatmul::apply(x.as_tensor(), &w).unwrap();
        assert_eq!(frozen.dims(), &[2, 3, 5]);
        assert!(crate::test_util::max_abs_diff(&frozen, &composed) < 1e-6);
        let loss = |y: &Tensor| (y * &g).unwrap().sum_all().unwrap();
        let want = loss(&composed).backward().unwrap();
        let got = loss(&frozen).backward().unwrap();
        let (gx, wx) = (got.get(&x).unwrap(), want.get(&x).unwrap());
        assert!(crate::test_util::max_abs_diff(gx, wx) < 1e-5);
        // a gradient the weight's size: candle's matmul makes one (for the broadcast Wᵀ), the
        // frozen op none
        let weight_sized = |store: &candle_core::backprop::GradStore| {
            store.get_ids().any(|id| {
                let dims = store.get_id(*id).unwrap().dims().to_vec();
                dims.ends_with(&[6, 5]) || dims.ends_with(&[5, 6])
            })
        };
        assert!(
            weight_sized(&want),
            "candle's matmul computes the weight's gradient"
        );
        assert!(!weight_sized(&got), "the frozen op made a weight gradient");
        let bad = Tensor::zeros((2, 3, 4), DType::F32, &dev).unwrap();
        assert!(FrozenMatmul::apply(&bad, &w).is_err());
    }
}

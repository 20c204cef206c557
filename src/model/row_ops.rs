//! Per-row broadcast ops whose parameter's gradient is a sum over the rows: a projection's bias
//! (y + b) and a norm's weight (x · w). candle's broadcast backward sums in the gradient's dtype,
//! and in bf16 a sum over thousands of rows stalls once its terms fall below half a spacing of
//! the running total (a test: 68% off at 16,384 rows). These ops are one graph node each whose
//! backward sums over the rows in f32 and rounds the result once to the parameter's dtype, as
//! torch's reductions accumulate bf16 in f32. Their forward is candle's broadcast op's, bit for
//! bit.

use candle_core::backend::BackendStorage;
use candle_core::op::{Add, Mul};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// p's layout broadcast over x's rows, where p is [n] for x [.., n].
fn over_rows(what: &str, xl: &Layout, pl: &Layout) -> Result<Layout> {
    if pl.dims().len() != 1 || xl.dims().last() != pl.dims().first() {
        candle_core::bail!(
            "{what}: a parameter {:?} for rows of {:?}",
            pl.dims(),
            xl.dims()
        )
    }
    pl.broadcast_as(xl.shape())
}

/// `t` [.., n] summed over its rows in f32: [n] in `dtype`.
fn row_sum(t: &Tensor, n: usize, dtype: DType) -> Result<Tensor> {
    let rows = t.elem_count() / n.max(1);
    t.reshape((rows, n))?
        .to_dtype(DType::F32)?
        .sum(0)?
        .to_dtype(dtype)
}

/// y + b for y [.., n] and a bias b [n].
pub fn bias_add(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    y.contiguous()?.apply_op2(&b.contiguous()?, RowOp::BiasAdd)
}

/// x · w for x [.., n] and a weight w [n] (a norm's scale).
pub fn scale_rows(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RowOp::Scale)
}

/// [`bias_add`] and [`scale_rows`].
#[derive(Debug, Clone, Copy)]
enum RowOp {
    BiasAdd,
    Scale,
}

impl RowOp {
    fn fwd<S: BackendStorage>(self, x: &S, xl: &Layout, p: &S, pl: &Layout) -> Result<(S, Shape)> {
        let pl = over_rows(self.name_str(), xl, pl)?;
        let out = match self {
            RowOp::BiasAdd => x.binary_impl::<Add>(p, xl, &pl)?,
            RowOp::Scale => x.binary_impl::<Mul>(p, xl, &pl)?,
        };
        Ok((out, xl.shape().clone()))
    }

    fn name_str(self) -> &'static str {
        match self {
            RowOp::BiasAdd => "refdpo-bias-add",
            RowOp::Scale => "refdpo-scale-rows",
        }
    }
}

impl CustomOp2 for RowOp {
    fn name(&self) -> &'static str {
        self.name_str()
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        p: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd(x, xl, p, pl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        p: &candle_core::CudaStorage,
        pl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.fwd(x, xl, p, pl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _out: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = p.elem_count();
        // a frozen parameter (LoRA's base) gets no gradient: nothing is summed for it
        let frozen = !p.track_op();
        Ok(match self {
            RowOp::BiasAdd if frozen => (Some(dy.clone()), None),
            RowOp::BiasAdd => (Some(dy.clone()), Some(row_sum(dy, n, p.dtype())?)),
            RowOp::Scale => {
                // dx = dy · w in x's dtype (candle's broadcast_mul backward); dw = Σ dy · x, the
                // products in f32
                let dx = dy.broadcast_mul(p)?;
                if frozen {
                    return Ok((Some(dx), None));
                }
                let prod = (dy.to_dtype(DType::F32)? * x.to_dtype(DType::F32)?)?;
                (Some(dx), Some(row_sum(&prod, n, p.dtype())?))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;
    use candle_core::{Device, Var};

    /// The parameter's gradient over 16,384 rows in bf16, for a bias and for a norm's scale:
    /// within bf16's rounding of the f64 sum, where candle's broadcast backward (the sum in
    /// bf16) is far off; the other input's gradient and the forward are candle's.
    #[test]
    fn a_parameter_gradient_over_many_rows_is_summed_in_f32() {
        for scale in [false, true] {
            one_parameter_gradient(scale);
        }
    }

    fn one_parameter_gradient(scale: bool) {
        let dev = Device::Cpu;
        let rows = 16_384;
        let bf16 = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
        let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        // positive inputs (a norm's normalized rows, scaled), an upstream gradient of small
        // mixed-sign values with a mean: the parameter's gradient has a mean over the rows
        let x0 = (Tensor::randn(0f32, 1.0, (2, rows / 2, 3), &dev)
            .unwrap()
            .abs()
            .unwrap()
            + 0.5)
            .unwrap();
        let x = Var::from_tensor(&bf16(x0)).unwrap();
        let p = Var::from_tensor(&bf16(Tensor::new(&[0.5f32, -1.0, 2.0], &dev).unwrap())).unwrap();
        let g = bf16((Tensor::randn(0f32, 1e-3, (2, rows / 2, 3), &dev).unwrap() + 2e-4).unwrap());
        let (ours, plain) = if scale {
            (
                scale_rows(x.as_tensor(), p.as_tensor()).unwrap(),
                x.as_tensor().broadcast_mul(p.as_tensor()).unwrap(),
            )
        } else {
            (
                bias_add(x.as_tensor(), p.as_tensor()).unwrap(),
                x.as_tensor().broadcast_add(p.as_tensor()).unwrap(),
            )
        };
        let per_row = if scale {
            (f64(&g) * f64(x.as_tensor())).unwrap()
        } else {
            f64(&g)
        };
        let want = per_row.reshape((rows, 3)).unwrap().sum(0).unwrap();
        let rel = |got: &Tensor| -> f64 {
            let top = want
                .abs()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            let d = (f64(got) - &want).unwrap().abs().unwrap();
            d.max(0).unwrap().to_scalar::<f64>().unwrap() / top
        };
        assert_eq!(max_abs_diff(&f32_of(&ours), &f32_of(&plain)), 0.0);
        let backward = |out: &Tensor| {
            (f32_of(out) * f32_of(&g))
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let (store, theirs) = (backward(&ours), backward(&plain));
        let dp = store.get(p.as_tensor()).unwrap();
        assert_eq!(dp.dtype(), DType::BF16);
        assert!(rel(dp) < 1e-2, "scale {scale}: {}", rel(dp));
        let dx = |s: &candle_core::backprop::GradStore| f32_of(s.get(x.as_tensor()).unwrap());
        assert_eq!(
            max_abs_diff(&dx(&store), &dx(&theirs)),
            0.0,
            "scale {scale}"
        );
        // candle's own backward of the broadcast
        let off = rel(theirs.get(p.as_tensor()).unwrap());
        assert!(off > 0.3, "scale {scale}: {off}");
    }

    fn f32_of(t: &Tensor) -> Tensor {
        t.to_dtype(DType::F32).unwrap()
    }
}

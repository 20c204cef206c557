//! RMSNorm as one kernel per direction: the forward normalizes each row in f32, and the backward
//! writes dx and the weight's f32 gradient (per-block partial sums) in a single pass.

use super::elem::{round, slice, with_float, Elem};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

const NAME: &str = "rms norm";

/// y = x / sqrt(mean(x²) + eps) · w over the last dimension. With `w` in the activations' dtype
/// the normalized row is rounded to it before the product (transformers' `LlamaRMSNorm`); with
/// an f32 `w` over bf16/f16 activations (Gemma's 1 + w) the product is taken in f32 and rounded
/// once.
#[derive(Debug, Clone, Copy)]
pub struct RmsNormOp {
    pub eps: f32,
}

/// Whether the normalized row is rounded to the activations' dtype before the weight.
fn round_first(x: DType, w: DType) -> bool {
    x == w
}

fn last_dim(layout: &Layout) -> usize {
    layout.dims().last().copied().unwrap_or(1).max(1)
}

/// The weight's dtype must be the activations' or f32.
fn check_weight(x: DType, w: DType) -> Result<()> {
    if w == x || w == DType::F32 {
        return Ok(());
    }
    Err(candle_core::Error::Msg(format!(
        "fused {NAME}: weight in {w:?} over activations in {x:?}"
    )))
}

impl RmsNormOp {
    fn forward<T: Elem, W: Elem>(&self, x: &[T], w: &[W], first: bool) -> Vec<T> {
        let h = w.len();
        let mut y = vec![T::zero(); x.len()];
        x.par_chunks(h)
            .zip(y.par_chunks_mut(h))
            .for_each(|(xr, yr)| {
                let ss: f32 = xr.iter().map(|v| v.f() * v.f()).sum();
                let denom = (ss / h as f32 + self.eps).sqrt();
                for ((out, v), w) in yr.iter_mut().zip(xr).zip(w) {
                    let n = v.f() / denom;
                    let n = if first { round::<T>(n) } else { n };
                    *out = T::of(n * w.f());
                }
            });
        y
    }

    /// [rows + 1, h] f32: dx, then dw (one partial sum: the CPU runs one "block").
    fn backward<T: Elem, W: Elem>(&self, x: &[T], w: &[W], g: &[T]) -> Vec<f32> {
        let h = w.len();
        let rows = x.len() / h;
        let mut out = vec![0f32; (rows + 1) * h];
        let (dx, dw) = out.split_at_mut(rows * h);
        for ((xr, gr), dr) in x.chunks(h).zip(g.chunks(h)).zip(dx.chunks_mut(h)) {
            let ss: f32 = xr.iter().map(|v| v.f() * v.f()).sum();
            let rstd = 1.0 / (ss / h as f32 + self.eps).sqrt();
            let dot = xr
                .iter()
                .zip(gr)
                .zip(w)
                .map(|((x, g), w)| g.f() * w.f() * x.f() * rstd)
                .sum::<f32>()
                / h as f32;
            for (j, d) in dr.iter_mut().enumerate() {
                let (xhat, gj) = (xr[j].f() * rstd, gr[j].f());
                *d = rstd * (gj * w[j].f() - xhat * dot);
                dw[j] += gj * xhat;
            }
        }
        out
    }
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "refdpo-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        check_weight(x.dtype(), w.dtype())?;
        let first = round_first(x.dtype(), w.dtype());
        with_float!(x.dtype(), NAME, T => {
            let xs = slice::<T>(NAME, x, xl)?;
            let y = if w.dtype() == DType::F32 {
                self.forward(xs, slice::<f32>(NAME, w, wl)?, first)
            } else {
                self.forward(xs, slice::<T>(NAME, w, wl)?, first)
            };
            Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::launch::{count, launch, per_row, view};
        check_weight(x.dtype(), w.dtype())?;
        let n = xl.shape().elem_count();
        count(NAME, n)?;
        let h = last_dim(xl);
        let hu = h as u32;
        let dev = &x.device;
        let kernel = kernel_name("rms_norm_fwd", x.dtype(), w.dtype());
        with_float!(x.dtype(), NAME, T => {
            let xv = view::<T>(NAME, x, xl)?;
            let y = if w.dtype() == DType::F32 {
                let wv = view::<f32>(NAME, w, wl)?;
                launch!(dev, kernel, per_row(n / h, h), y: T = n; &xv, &wv, &y, &hu, &self.eps)
            } else {
                let wv = view::<T>(NAME, w, wl)?;
                launch!(dev, kernel, per_row(n / h, h), y: T = n; &xv, &wv, &y, &hu, &self.eps)
            };
            Ok((candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone()), xl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let h = w.elem_count();
        let rows = x.elem_count() / h.max(1);
        let out = x.apply_op3_no_bwd(w, &grad.contiguous()?, &RmsNormBackward { eps: self.eps })?;
        let blocks = out.dim(0)? - rows;
        let dx = out
            .narrow(0, 0, rows)?
            .reshape(x.shape())?
            .to_dtype(x.dtype())?;
        let dw = out.narrow(0, rows, blocks)?.sum(0)?.to_dtype(w.dtype())?;
        Ok((Some(dx), Some(dw)))
    }
}

/// The kernel for activations in `x` and a weight in `w` (the `_wf32` ones: an f32 weight over
/// bf16/f16 activations).
#[cfg(feature = "cuda")]
fn kernel_name(base: &str, x: DType, w: DType) -> String {
    if w == DType::F32 && x != DType::F32 {
        format!("{base}_{}_wf32", x.as_str())
    } else {
        format!("{base}_{}", x.as_str())
    }
}

/// (x, w, dy) → [rows + blocks, h] f32: dx, then each block's partial dw.
#[derive(Debug, Clone, Copy)]
struct RmsNormBackward {
    eps: f32,
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "refdpo-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        check_weight(x.dtype(), w.dtype())?;
        let h = last_dim(xl);
        let op = RmsNormOp { eps: self.eps };
        with_float!(x.dtype(), NAME, T => {
            let (xs, gs) = (slice::<T>(NAME, x, xl)?, slice::<T>(NAME, g, gl)?);
            let out = if w.dtype() == DType::F32 {
                op.backward(xs, slice::<f32>(NAME, w, wl)?, gs)
            } else {
                op.backward(xs, slice::<T>(NAME, w, wl)?, gs)
            };
            let rows = out.len() / h;
            Ok((CpuStorage::F32(out), Shape::from((rows, h))))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::launch::{count, launch, per_row, view};
        check_weight(x.dtype(), w.dtype())?;
        let h = last_dim(xl);
        let rows = xl.shape().elem_count() / h;
        // enough blocks to fill the device; each sums its rows' dw in place
        let blocks = rows.clamp(1, 1024);
        let len = (rows + blocks) * h;
        count(NAME, len)?;
        let (ru, hu) = (rows as u32, h as u32);
        let dev = &x.device;
        let kernel = kernel_name("rms_norm_bwd", x.dtype(), w.dtype());
        let cfg = per_row(blocks, h);
        with_float!(x.dtype(), NAME, T => {
            let (xv, gv) = (view::<T>(NAME, x, xl)?, view::<T>(NAME, g, gl)?);
            let out = if w.dtype() == DType::F32 {
                let wv = view::<f32>(NAME, w, wl)?;
                launch!(dev, kernel, cfg, out: f32 = len; &xv, &wv, &gv, &out, &ru, &hu, &self.eps)
            } else {
                let wv = view::<T>(NAME, w, wl)?;
                launch!(dev, kernel, cfg, out: f32 = len; &xv, &wv, &gv, &out, &ru, &hu, &self.eps)
            };
            Ok((
                candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()),
                Shape::from((rows + blocks, h)),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;
    use candle_core::{Device, Var, D};

    #[test]
    fn forward_and_backward_equal_the_composed_ops() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 24), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, 24, &dev).unwrap()).unwrap();
        let up = Tensor::randn(0f32, 1.0, (2, 3, 24), &dev).unwrap();
        let want = candle_nn::ops::rms_norm_slow(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        let got = x
            .as_tensor()
            .apply_op2(w.as_tensor(), RmsNormOp { eps: 1e-5 })
            .unwrap();
        assert!(max_abs_diff(&want, &got) < 1e-6);
        let gw = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gg = (got * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w] {
            let d = max_abs_diff(
                gw.get(v.as_tensor()).unwrap(),
                gg.get(v.as_tensor()).unwrap(),
            );
            assert!(d < 1e-5, "{d}");
        }
    }

    #[test]
    fn bf16_rounds_where_transformers_does() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 3.0, (4, 32), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.5, 32, &dev).unwrap();
        let (xb, wb) = (
            x.to_dtype(DType::BF16).unwrap(),
            w.to_dtype(DType::BF16).unwrap(),
        );
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        // Llama: normalize in f32, round, times the bf16 weight
        let want = candle_nn::ops::rms_norm_slow(&xb, &wb, 1e-6).unwrap();
        let got = xb.apply_op2(&wb, RmsNormOp { eps: 1e-6 }).unwrap();
        assert!(max_abs_diff(&f32(&want), &f32(&got)) < 2e-2);
        // Gemma: an f32 weight, the product in f32, rounded once
        let xf = f32(&xb);
        let ms = xf.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let want = xf
            .broadcast_div(&(ms + 1e-6).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&w)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let got = xb.apply_op2(&w, RmsNormOp { eps: 1e-6 }).unwrap();
        assert!(max_abs_diff(&f32(&want), &f32(&got)) < 2e-2);
    }
}

//! The attention row op: scale, causal (and sliding-window) mask and softmax in f32 over each
//! row of scores in one kernel, and its backward in another. Grouped-query attention passes a kv
//! head's query heads stacked as rows, so K and V are never repeated.

use super::elem::{round, slice, with_float, Elem};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType, D,
};
use rayon::prelude::*;

const NAME: &str = "attention softmax";

/// Which keys each row of scores [.., rows, keys] sees, and the scale applied before the softmax.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnSoftmax {
    pub scale: f32,
    /// Rows per query group: row r's query sits at position `r % group_rows + q_offset`.
    pub group_rows: usize,
    pub q_offset: usize,
    /// Keys within this many positions of the query (q − window < j ≤ q); 0 for no window.
    pub window: usize,
}

impl AttnSoftmax {
    /// Keys [lo, hi) of row `row`.
    fn keys(&self, row: usize, cols: usize) -> (usize, usize) {
        let q = row % self.group_rows.max(1) + self.q_offset;
        let lo = if self.window != 0 && q + 1 > self.window {
            q + 1 - self.window
        } else {
            0
        };
        (lo.min(cols), (q + 1).min(cols))
    }

    /// The composed version, which the fused op equals: scores · scale in their dtype, then the
    /// additive mask and the softmax in f32, cast back (transformers' eager attention).
    pub fn composed(&self, scores: &Tensor) -> Result<Tensor> {
        let (rows, cols) = (scores.dim(D::Minus2)?, scores.dim(D::Minus1)?);
        let mask: Vec<f32> = (0..rows)
            .flat_map(|r| {
                let (lo, hi) = self.keys(r, cols);
                (0..cols).map(move |j| {
                    if (lo..hi).contains(&j) {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (rows, cols), scores.device())?;
        let s = (scores * f64::from(self.scale))?
            .to_dtype(DType::F32)?
            .broadcast_add(&mask)?;
        candle_nn::ops::softmax(&s, D::Minus1)?.to_dtype(scores.dtype())
    }

    fn forward<T: Elem>(&self, x: &[T], cols: usize) -> Vec<T> {
        let mut y = vec![T::zero(); x.len()];
        let rows = x.par_chunks(cols).zip(y.par_chunks_mut(cols)).enumerate();
        rows.for_each(|(r, (xr, yr))| {
            let (lo, hi) = self.keys(r, cols);
            let s: Vec<f32> = xr[lo..hi]
                .iter()
                .map(|v| round::<T>(v.f() * self.scale))
                .collect();
            let m = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let sum: f32 = s.iter().map(|v| (v - m).exp()).sum();
            for (out, v) in yr[lo..hi].iter_mut().zip(&s) {
                *out = T::of((v - m).exp() / sum);
            }
        });
        y
    }
}

fn cols(layout: &Layout) -> Result<usize> {
    Ok(layout.dims().last().copied().unwrap_or(1).max(1))
}

impl CustomOp1 for AttnSoftmax {
    fn name(&self) -> &'static str {
        "refdpo-attn-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let cols = cols(l)?;
        with_float!(s.dtype(), NAME, T => {
            let y = self.forward(slice::<T>(NAME, s, l)?, cols);
            Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::launch::{count, launch, per_row, view};
        let n = l.shape().elem_count();
        count(NAME, n)?;
        let cols = cols(l)?;
        let dev = &s.device;
        let (c, group, offset, window) = (
            cols as u32,
            self.group_rows as u32,
            self.q_offset as u32,
            self.window as u32,
        );
        let kernel = format!("attn_softmax_fwd_{}", s.dtype().as_str());
        with_float!(s.dtype(), NAME, T => {
            let x = view::<T>(NAME, s, l)?;
            let y = launch!(dev, kernel, per_row(n / cols, cols), y: T = n;
                &x, &y, &c, &group, &offset, &window, &self.scale);
            Ok((candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone()), l.shape().clone()))
        })
    }

    fn bwd(&self, _scores: &Tensor, probs: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = AttnSoftmaxBackward { scale: self.scale };
        Ok(Some(probs.apply_op2_no_bwd(&grad.contiguous()?, &back)?))
    }
}

/// d scores from the probabilities p and their gradient g: scale · p · (g − Σ p·g) per row.
#[derive(Debug, Clone, Copy)]
struct AttnSoftmaxBackward {
    scale: f32,
}

impl AttnSoftmaxBackward {
    fn backward<T: Elem>(&self, p: &[T], g: &[T], cols: usize) -> Vec<T> {
        let mut dx = vec![T::zero(); p.len()];
        let rows = p.par_chunks(cols).zip(g.par_chunks(cols));
        rows.zip(dx.par_chunks_mut(cols))
            .for_each(|((pr, gr), dr)| {
                let dot: f32 = pr.iter().zip(gr).map(|(p, g)| p.f() * g.f()).sum();
                for ((d, p), g) in dr.iter_mut().zip(pr).zip(gr) {
                    *d = T::of(self.scale * p.f() * (g.f() - dot));
                }
            });
        dx
    }
}

impl CustomOp2 for AttnSoftmaxBackward {
    fn name(&self) -> &'static str {
        "refdpo-attn-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        pl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let cols = cols(pl)?;
        with_float!(p.dtype(), NAME, T => {
            let dx = self.backward(slice::<T>(NAME, p, pl)?, slice::<T>(NAME, g, gl)?, cols);
            Ok((T::to_cpu_storage_owned(dx), pl.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &candle_core::CudaStorage,
        pl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::launch::{count, launch, per_row, view};
        let n = pl.shape().elem_count();
        count(NAME, n)?;
        let cols = cols(pl)?;
        let c = cols as u32;
        let dev = &p.device;
        let kernel = format!("attn_softmax_bwd_{}", p.dtype().as_str());
        with_float!(p.dtype(), NAME, T => {
            let (pv, gv) = (view::<T>(NAME, p, pl)?, view::<T>(NAME, g, gl)?);
            let dx = launch!(dev, kernel, per_row(n / cols, cols), dx: T = n;
                &pv, &gv, &dx, &c, &self.scale);
            Ok((candle_core::CudaStorage::wrap_cuda_slice(dx, dev.clone()), pl.shape().clone()))
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
        // [b, kv heads, groups·T, keys]: 2 query heads per kv head over T = 5 queries, with and
        // without a window, and queries after a 2-key prefix (decoding against a cache)
        for (op, rows, keys) in [
            (
                AttnSoftmax {
                    scale: 0.7,
                    group_rows: 5,
                    q_offset: 0,
                    window: 0,
                },
                10,
                5,
            ),
            (
                AttnSoftmax {
                    scale: 0.7,
                    group_rows: 5,
                    q_offset: 0,
                    window: 2,
                },
                10,
                5,
            ),
            (
                AttnSoftmax {
                    scale: 1.3,
                    group_rows: 3,
                    q_offset: 2,
                    window: 0,
                },
                6,
                5,
            ),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (2, 3, rows, keys), &dev).unwrap())
                .unwrap();
            let up = Tensor::randn(0f32, 1.0, (2, 3, rows, keys), &dev).unwrap();
            let want = op.composed(x.as_tensor()).unwrap();
            let got = x.as_tensor().apply_op1(op).unwrap();
            assert!(max_abs_diff(&want, &got) < 1e-6, "{op:?}");
            let gw = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let gg = (got * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let d = max_abs_diff(
                gw.get(x.as_tensor()).unwrap(),
                gg.get(x.as_tensor()).unwrap(),
            );
            assert!(d < 1e-6, "{op:?}: {d}");
        }
    }

    #[test]
    fn bf16_rounds_the_scaled_scores_as_transformers() {
        let dev = Device::Cpu;
        let op = AttnSoftmax {
            scale: 0.125,
            group_rows: 4,
            q_offset: 0,
            window: 0,
        };
        let x = Tensor::randn(0f32, 8.0, (1, 1, 4, 4), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        // transformers: (q·kᵀ · scale) in bf16, + mask, softmax in f32, cast
        let want = op.composed(&x).unwrap();
        let got = x.apply_op1(op).unwrap();
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        assert!(max_abs_diff(&f32(&want), &f32(&got)) < 5e-3);
    }
}

//! Completion log-probs over a chunk of logits: log-sum-exp and the target's logit in one pass
//! (no f32 copy of the chunk), and the gradient d logp / d logits = onehot(target) − softmax as
//! one elementwise kernel (no one-hot tensor, no scatter).

use super::elem::{slice, with_float, Elem};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, WithDType};
use rayon::prelude::*;

const NAME: &str = "log-probs";

/// (logits [n, v], targets [n] u32) → [2, n] f32: (log p(target), log-sum-exp).
#[derive(Debug, Clone, Copy)]
pub struct LogpLse;

fn rows_cols(layout: &Layout) -> Result<(usize, usize)> {
    match layout.dims() {
        [n, v] => Ok((*n, *v)),
        d => Err(candle_core::Error::Msg(format!(
            "fused {NAME}: expected logits [n, v], got {d:?}"
        ))),
    }
}

fn logp_lse<T: Elem>(z: &[T], targets: &[u32], v: usize) -> Vec<f32> {
    let rows: Vec<(f32, f32)> = z
        .par_chunks(v)
        .zip(targets)
        .map(|(zr, &t)| {
            // The exps summed in f64, as the kernel does: in f32 the top logit's share drops
            // every term below half an ulp of 1, and the log-sum-exp comes out low.
            let m = zr.iter().fold(f32::NEG_INFINITY, |a, b| a.max(b.f()));
            let s: f64 = zr.iter().map(|x| f64::from((x.f() - m).exp())).sum();
            let lse = f64::from(m) + s.ln();
            let logp = zr
                .get(t as usize)
                .map_or(f32::NAN, |x| (f64::from(x.f()) - lse) as f32);
            (logp, lse as f32)
        })
        .collect();
    let (mut out, lses): (Vec<f32>, Vec<f32>) = rows.into_iter().unzip();
    out.extend(lses);
    out
}

impl CustomOp2 for LogpLse {
    fn name(&self) -> &'static str {
        "refdpo-logp-lse"
    }

    fn cpu_fwd(
        &self,
        z: &CpuStorage,
        zl: &Layout,
        t: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, v) = rows_cols(zl)?;
        let targets = slice::<u32>(NAME, t, tl)?;
        with_float!(z.dtype(), NAME, T => {
            let out = logp_lse(slice::<T>(NAME, z, zl)?, targets, v);
            Ok((CpuStorage::F32(out), Shape::from((2, n))))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        z: &candle_core::CudaStorage,
        zl: &Layout,
        t: &candle_core::CudaStorage,
        tl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::launch::{count, launch, per_row, view};
        let (n, v) = rows_cols(zl)?;
        count(NAME, n * v)?;
        let (nu, vu) = (n as u32, v as u32);
        let dev = &z.device;
        let kernel = format!("logp_lse_{}", z.dtype().as_str());
        let tv = view::<u32>(NAME, t, tl)?;
        with_float!(z.dtype(), NAME, T => {
            let zv = view::<T>(NAME, z, zl)?;
            let out = launch!(dev, kernel, per_row(n, v), out: f32 = 2 * n; &zv, &tv, &out, &nu, &vu);
            Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((2, n))))
        })
    }
}

/// (logits chunk [n, len] from vocabulary entry `v0`, targets [n] u32, [2, n] f32 (lse, g)) →
/// g · (onehot(target − v0) − exp(logits − lse)) [n, len] in the logits' dtype.
#[derive(Debug, Clone, Copy)]
pub struct LogpGrad {
    pub v0: usize,
}

impl LogpGrad {
    fn backward<T: Elem>(&self, z: &[T], targets: &[u32], lg: &[f32], len: usize) -> Vec<T> {
        let n = targets.len();
        let mut dz = vec![T::zero(); z.len()];
        let rows = z.par_chunks(len).zip(dz.par_chunks_mut(len)).enumerate();
        rows.for_each(|(i, (zr, dr))| {
            let (lse, g) = (lg[i], lg[n + i]);
            for (j, (x, d)) in zr.iter().zip(dr.iter_mut()).enumerate() {
                let hit = if targets[i] as usize == self.v0 + j {
                    g
                } else {
                    0.0
                };
                *d = T::of(hit - g * (x.f() - lse).exp());
            }
        });
        dz
    }
}

impl CustomOp3 for LogpGrad {
    fn name(&self) -> &'static str {
        "refdpo-logp-grad"
    }

    fn cpu_fwd(
        &self,
        z: &CpuStorage,
        zl: &Layout,
        t: &CpuStorage,
        tl: &Layout,
        lg: &CpuStorage,
        ll: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, len) = rows_cols(zl)?;
        let targets = slice::<u32>(NAME, t, tl)?;
        let lg = slice::<f32>(NAME, lg, ll)?;
        with_float!(z.dtype(), NAME, T => {
            let dz = self.backward(slice::<T>(NAME, z, zl)?, targets, lg, len);
            Ok((T::to_cpu_storage_owned(dz), zl.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        z: &candle_core::CudaStorage,
        zl: &Layout,
        t: &candle_core::CudaStorage,
        tl: &Layout,
        lg: &candle_core::CudaStorage,
        ll: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::launch::{count, elementwise, launch, view};
        let (n, len) = rows_cols(zl)?;
        count(NAME, n * len)?;
        let (nu, lu, v0) = (n as u32, len as u32, count(NAME, self.v0)?);
        let dev = &z.device;
        let kernel = format!("logp_grad_{}", z.dtype().as_str());
        let (tv, lv) = (view::<u32>(NAME, t, tl)?, view::<f32>(NAME, lg, ll)?);
        with_float!(z.dtype(), NAME, T => {
            let zv = view::<T>(NAME, z, zl)?;
            let dz = launch!(dev, kernel, elementwise(n * len), dz: T = n * len;
                &zv, &tv, &lv, &dz, &nu, &lu, &v0);
            Ok((candle_core::CudaStorage::wrap_cuda_slice(dz, dev.clone()), zl.shape().clone()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;
    use candle_core::{DType, Device, Tensor, D};

    #[test]
    fn log_probs_and_their_gradient_equal_the_composed_ops() {
        let dev = Device::Cpu;
        let z = Tensor::randn(0f32, 3.0, (4, 11), &dev).unwrap();
        let targets = Tensor::new(&[0u32, 10, 3, 3], &dev).unwrap();
        let g = Tensor::new(&[1f32, -0.5, 2.0, 0.0], &dev).unwrap();
        let ls = candle_nn::ops::log_softmax(&z, D::Minus1).unwrap();
        let want_lp = ls
            .gather(&targets.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        let want_lse = z.exp().unwrap().sum(D::Minus1).unwrap().log().unwrap();
        let out = z.apply_op2_no_bwd(&targets, &LogpLse).unwrap();
        assert!(max_abs_diff(&want_lp, &out.get(0).unwrap()) < 1e-5);
        assert!(max_abs_diff(&want_lse, &out.get(1).unwrap()) < 1e-5);
        // d Σ g·logp / dz, whole and in vocabulary chunks [0, 4), [4, 11)
        let onehot = Tensor::zeros((4, 11), DType::F32, &dev)
            .unwrap()
            .scatter_add(
                &targets.unsqueeze(1).unwrap(),
                &Tensor::ones((4, 1), DType::F32, &dev).unwrap(),
                1,
            )
            .unwrap();
        let want = (onehot - ls.exp().unwrap())
            .unwrap()
            .broadcast_mul(&g.unsqueeze(1).unwrap())
            .unwrap();
        let lg = Tensor::stack(&[out.get(1).unwrap(), g.clone()], 0).unwrap();
        let whole = z
            .apply_op3_no_bwd(&targets, &lg, &LogpGrad { v0: 0 })
            .unwrap();
        assert!(max_abs_diff(&want, &whole) < 1e-5);
        let parts = [(0, 4), (4, 7)].map(|(v0, len)| {
            z.narrow(1, v0, len)
                .unwrap()
                .contiguous()
                .unwrap()
                .apply_op3_no_bwd(&targets, &lg, &LogpGrad { v0 })
                .unwrap()
        });
        assert!(max_abs_diff(&want, &Tensor::cat(&parts, 1).unwrap()) < 1e-5);
    }

    #[test]
    fn a_target_outside_the_vocabulary_is_nan() {
        let dev = Device::Cpu;
        let z = Tensor::zeros((1, 3), DType::F32, &dev).unwrap();
        let out = z
            .apply_op2_no_bwd(&Tensor::new(&[3u32], &dev).unwrap(), &LogpLse)
            .unwrap();
        assert!(out.get(0).unwrap().to_vec1::<f32>().unwrap()[0].is_nan());
    }

    #[test]
    fn a_vocabularys_small_terms_are_kept() {
        // One logit of 0 and 49,151 of -16.7: each exp(-16.7) is below half an f32 ulp of 1, so an
        // f32 sum after the top term drops them all (the log-sum-exp 2.7e-3 low).
        let v = 49_152;
        let mut row = vec![-16.7f32; v];
        row[0] = 0.0;
        let z = Tensor::from_vec(row, (1, v), &Device::Cpu).unwrap();
        let t = Tensor::new(&[0u32], &Device::Cpu).unwrap();
        let out = z
            .apply_op2_no_bwd(&t, &LogpLse)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let exact = ((v - 1) as f64 * f64::from(-16.7f32).exp()).ln_1p();
        assert!(
            (f64::from(out[1][0]) - exact).abs() < 1e-8,
            "{} vs {exact}",
            out[1][0]
        );
        assert!((f64::from(out[0][0]) + exact).abs() < 1e-8);
    }
}

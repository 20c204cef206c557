//! RMSNorm: HF's (normalize in f32, cast back, scale), Gemma's (1 + w) in f32, and the fused op.

use super::config::TransformerConfig;
use super::fused::{self, Kernel};
use super::row_ops;
use super::OpMode;
use crate::error::Result;
use crate::profile::{self, Phase};
use candle_core::{DType, Tensor, D};

/// RMSNorm as in HF: normalize in f32, cast back, scale.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
    /// Gemma's form: `weight` holds (1 + w) in f32, and the product is taken in f32 before the
    /// cast, as transformers' `Gemma2RMSNorm` does.
    scale_in_f32: bool,
}

impl RmsNorm {
    /// The family's norm over `weight`: Gemma scales by (1 + w) in f32, the others by w in the
    /// compute dtype. The 1 is added here, so a tracked `weight` still gets its gradient.
    pub fn for_family(cfg: &TransformerConfig, weight: Tensor) -> Result<Self> {
        if !cfg.gemma {
            return Ok(Self::new(weight, cfg.rms_norm_eps));
        }
        Ok(Self {
            weight: (weight.to_dtype(DType::F32)? + 1.0)?,
            eps: cfg.rms_norm_eps as f32,
            scale_in_f32: true,
        })
    }

    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self {
            weight,
            eps: eps as f32,
            scale_in_f32: false,
        }
    }

    pub fn forward(&self, x: &Tensor, mode: OpMode) -> Result<Tensor> {
        let _phase = profile::scope(Phase::Norms);
        if mode.fuses(x, Kernel::Norm) {
            return Ok(fused::rms_norm(x, &self.weight, self.eps)?);
        }
        if self.scale_in_f32 {
            let xf = x.to_dtype(DType::F32)?;
            let ms = mean_last(&xf.sqr()?)?;
            let normed = xf.broadcast_div(&(ms + f64::from(self.eps))?.sqrt()?)?;
            return Ok(normed.broadcast_mul(&self.weight)?.to_dtype(x.dtype())?);
        }
        Ok(match mode {
            OpMode::Fast => candle_nn::ops::rms_norm(x, &self.weight, self.eps)?,
            _ => rms_norm_composed(x, &self.weight, self.eps)?,
        })
    }
}

/// The mean over the last dimension, the sum divided by its length as torch divides: candle's
/// `mean_keepdim` and `x / f64` multiply by the length's rounded reciprocal, which scales every
/// row's mean the same way (the pattern that put Gemma 2's soft-capped log-probs on one side).
fn mean_last(x: &Tensor) -> Result<Tensor> {
    let n = Tensor::new(x.dim(D::Minus1)? as f64, x.device())?.to_dtype(x.dtype())?;
    Ok(x.sum_keepdim(D::Minus1)?.broadcast_div(&n)?)
}

/// candle-nn's `rms_norm_slow`, op for op, but the scale by `w` as one node whose weight
/// gradient sums over the rows in f32 ([`row_ops::scale_rows`]): in bf16, candle's broadcast
/// backward sums it in bf16, far from the total over a batch's thousands of rows.
fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let dtype = x.dtype();
    let internal = match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    };
    let xi = x.to_dtype(internal)?;
    let ms = mean_last(&xi.sqr()?)?;
    let normed = xi.broadcast_div(&(ms + f64::from(eps))?.sqrt()?)?;
    Ok(row_ops::scale_rows(&normed.to_dtype(dtype)?, w)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Each row's mean is its sum divided by the length, as torch's `mean` divides, not the sum
    /// times the length's rounded reciprocal (which `mean_keepdim` gives on some rows here).
    #[test]
    fn the_mean_divides_by_the_length() {
        let (rows, h) = (64, 96);
        let xs: Vec<f32> = (0..rows * h)
            .map(|i| ((i * 7919) % 1000) as f32 / 37.0)
            .collect();
        let x = Tensor::from_vec(xs, (rows, h), &Device::Cpu).unwrap();
        let values = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let sums = values(x.sum_keepdim(D::Minus1).unwrap());
        let want: Vec<f32> = sums.iter().map(|s| s / h as f32).collect();
        assert_eq!(values(mean_last(&x).unwrap()), want);
        let reciprocal = values(x.mean_keepdim(D::Minus1).unwrap());
        assert_ne!(
            reciprocal, want,
            "candle's mean is the multiply this replaces"
        );
    }
}

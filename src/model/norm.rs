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
            let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
            let normed = xf.broadcast_div(&(ms + f64::from(self.eps))?.sqrt()?)?;
            return Ok(normed.broadcast_mul(&self.weight)?.to_dtype(x.dtype())?);
        }
        Ok(match mode {
            OpMode::Fast => candle_nn::ops::rms_norm(x, &self.weight, self.eps)?,
            _ => rms_norm_composed(x, &self.weight, self.eps)?,
        })
    }
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
    let hidden = x.dim(D::Minus1)?;
    let xi = x.to_dtype(internal)?;
    let ms = (xi.sqr()?.sum_keepdim(D::Minus1)? / hidden as f64)?;
    let normed = xi.broadcast_div(&(ms + f64::from(eps))?.sqrt()?)?;
    Ok(row_ops::scale_rows(&normed.to_dtype(dtype)?, w)?)
}

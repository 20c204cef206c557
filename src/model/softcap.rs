//! Gemma 2's soft-capping, cap · tanh(x / cap): of the final logits (scoring, decoding) and, in
//! the composed attention, of the scores.

use crate::error::Result;
use candle_core::Tensor;

/// cap · tanh(logits / cap); the identity without a cap.
pub fn softcap(logits: Tensor, cap: Option<f64>) -> Result<Tensor> {
    Ok(match cap {
        Some(c) => ((logits / c)?.tanh()? * c)?,
        None => logits,
    })
}

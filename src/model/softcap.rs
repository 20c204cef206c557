//! Gemma 2's soft-capping, cap · tanh(x / cap): of the final logits (scoring, decoding) and, in
//! the composed attention, of the scores.

use crate::error::Result;
use candle_core::Tensor;

/// cap · tanh(logits / cap); the identity without a cap.
pub fn softcap(logits: Tensor, cap: Option<f64>) -> Result<Tensor> {
    Ok(match cap {
        Some(c) => (tanh_over(&logits, c)? * c)?,
        None => logits,
    })
}

/// tanh(x / cap), divided as transformers divides. candle's `x / f64` multiplies by 1/cap rounded
/// to the tensor's dtype: f32(1/30) · 30 = 1 + 5e-8, which scaled every capped logit up and put
/// Gemma 2's log-probs on one side of an f64 forward on 28 of 30 sequences.
pub fn tanh_over(x: &Tensor, cap: f64) -> candle_core::Result<Tensor> {
    let cap = Tensor::new(cap, x.device())?.to_dtype(x.dtype())?;
    x.broadcast_div(&cap)?.tanh()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The argument of tanh is x / cap correctly rounded, as transformers divides: candle's
    /// `x / 30.0` (a multiply by f32(1/30)) differs from it on a share of the values.
    #[test]
    fn the_cap_divides_as_transformers_divides() {
        let xs: Vec<f32> = (0..20_000)
            .map(|i| (i as f32 - 10_000.0) * 0.0137)
            .collect();
        let x = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
        let divided: Vec<f32> = xs.iter().map(|v| v / 30.0).collect();
        let want: Vec<f32> = Tensor::new(divided.as_slice(), &Device::Cpu)
            .unwrap()
            .tanh()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got: Vec<f32> = tanh_over(&x, 30.0).unwrap().to_vec1().unwrap();
        assert_eq!(got, want);
        let old: Vec<f32> = (&x / 30.0).unwrap().to_vec1().unwrap();
        assert_ne!(
            old, divided,
            "candle's x / f64 is the multiply this replaces"
        );
    }
}

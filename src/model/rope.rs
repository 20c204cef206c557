//! Rotary position embeddings: the inverse frequencies (Llama-3 scaling included), the cos/sin
//! tables of a length or of given positions, and HF's rotate-half form at per-row positions.

use super::config::{Llama3Scaling, RopeConfig, RopeScaling};
use crate::error::Result;
use candle_core::{DType, Device, Tensor};

/// RoPE cos/sin tables [T, head_dim/2], computed in f32 as HF does, then cast.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    /// The inverse frequencies of one set of settings for heads of `head_dim`.
    pub fn new(rope: &RopeConfig, head_dim: usize) -> Self {
        let dim = head_dim;
        let mut inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / rope.theta.powf(i as f32 / dim as f32))
            .collect();
        match &rope.scaling {
            None => {}
            // transformers divides the frequencies, in f32
            Some(RopeScaling::Linear { factor }) => {
                for f in inv_freq.iter_mut() {
                    *f /= factor;
                }
            }
            Some(RopeScaling::Llama3(s)) => llama3(&mut inv_freq, s),
        }
        Self { inv_freq }
    }

    /// (cos, sin) at the given positions, each [positions, head_dim/2] in `dtype` on `device`.
    pub fn at(&self, positions: &[u32], dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let freqs: Vec<f32> = positions
            .iter()
            .flat_map(|&p| self.inv_freq.iter().map(move |f| p as f32 * f))
            .collect();
        let freqs = Tensor::from_vec(freqs, (positions.len(), half), device)?;
        Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
    }

    /// (cos, sin), each [seq_len, head_dim/2] in `dtype` on `device`.
    pub fn tables(
        &self,
        seq_len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut freqs = Vec::with_capacity(seq_len * half);
        for pos in 0..seq_len {
            freqs.extend(self.inv_freq.iter().map(|f| pos as f32 * f));
        }
        let freqs = Tensor::from_vec(freqs, (seq_len, half), device)?;
        Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
    }
}

/// Llama-3's frequency scaling: long wavelengths divided by `factor`, short ones kept, a smooth
/// blend between.
fn llama3(inv_freq: &mut [f32], s: &Llama3Scaling) {
    let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
    let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
    for f in inv_freq.iter_mut() {
        let wavelen = 2.0 * std::f32::consts::PI / *f;
        let scaled = if wavelen > low_wavelen {
            *f / s.factor
        } else {
            *f
        };
        let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
        *f = if medium {
            let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                / (s.high_freq_factor - s.low_freq_factor);
            (1.0 - smooth) * scaled / s.factor + smooth * scaled
        } else {
            scaled
        };
    }
}

/// RoPE (HF's rotate-half form) at per-row positions: x [B, n, t, hd], cos and sin [B, 1, t, hd/2].
pub(super) fn rope_at(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(3)? / 2;
    let (x1, x2) = (x.narrow(3, 0, half)?, x.narrow(3, half, half)?);
    let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let b = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Ok(Tensor::cat(&[a, b], 3)?)
}

//! Incremental decoding: the keys and values of every layer so far, and the forward of new
//! positions against them.

use super::rope::Rope;
use super::{OpMode, Transformer};
use crate::error::Result;
use candle_core::Tensor;

/// The keys and values of every layer so far ([B, kv_heads, T, hd] each), for incremental decoding.
#[derive(Debug, Default)]
pub struct KvCache {
    pub(super) layers: Vec<Option<(Tensor, Tensor)>>,
}

/// One incremental forward beside its ids [B, t]: each new slot's position (row-major, B·t),
/// and the additive masks [B, 1, t, T] over all T slots so far of full and sliding layers.
pub struct DecodeStep {
    pub positions: Vec<u32>,
    pub batch: usize,
    pub len: usize,
    pub mask: Tensor,
    pub sliding_mask: Option<Tensor>,
}

impl Transformer {
    /// Incremental forward for decoding: the new ids [B, t] at `step`'s positions against the
    /// keys and values in `cache` (extended here) → final-normed hidden [B, t, H]. Fused ops, no
    /// graph.
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        step: &DecodeStep,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, t, half) = (step.batch, step.len, self.cfg.head_dim / 2);
        let at = |rope: &Rope| -> Result<(Tensor, Tensor)> {
            let (cos, sin) = rope.at(&step.positions, self.dtype, ids.device())?;
            Ok((cos.reshape((b, 1, t, half))?, sin.reshape((b, 1, t, half))?))
        };
        let global = at(&self.rope)?;
        let local = self.local_rope.as_ref().map(at).transpose()?;
        cache.layers.resize(self.blocks.len(), None);
        let mut x = self.embed(ids)?;
        for (block, kv) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            let sliding = block.attn.sliding;
            let (cos, sin) = match (&local, sliding) {
                (Some((c, s)), true) => (c, s),
                _ => (&global.0, &global.1),
            };
            let mask = match (&step.sliding_mask, sliding) {
                (Some(m), true) => m,
                _ => &step.mask,
            };
            x = block.forward_cached(&x, (cos, sin), mask, kv)?;
        }
        self.final_norm(&x, OpMode::Fast)
    }
}

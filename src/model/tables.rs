//! The per-length tables every block of one forward shares — RoPE cos/sin (global and Gemma 3's
//! local), the causal and sliding-window masks, the attention chunking — built once per model
//! and device for the longest length seen and narrowed for shorter ones; and their packed form,
//! for sequences laid end to end along one row with no padding.

use super::attention::attention_chunk;
use super::lora::Dropout;
use super::packing::Sharing;
use super::Transformer;
use crate::error::Result;
use candle_core::{Device, Tensor};

/// Per-sequence-length tables shared by every block of one forward.
#[derive(Debug, Clone)]
pub struct SeqContext {
    /// The sequence length the tables are for.
    pub len: usize,
    pub cos: Tensor,
    pub sin: Tensor,
    /// [T, T] additive causal mask in f32: 0 where a query may attend, -inf elsewhere.
    pub mask: Tensor,
    /// The mask of sliding-window layers: a query at i sees keys i - w < j <= i
    /// (transformers' `sliding_window_causal_mask_function`).
    pub(super) sliding_mask: Option<Tensor>,
    /// Gemma 3's sliding layers' own RoPE tables (cos, sin).
    pub(super) local_rope: Option<(Tensor, Tensor)>,
    /// Sequences per chunk of attention scores ([`attention_chunk`]).
    pub attn_seqs: usize,
    /// LoRA dropout of a training forward (none when scoring).
    pub dropout: Option<Dropout>,
    /// A packed row's sequence lengths, end to end (none for a padded [B, T] batch): each
    /// attends within itself, from position 0. With `shared`, the whole layout's.
    pub segments: Option<std::sync::Arc<[usize]>>,
    /// A packed row whose sequences share first positions (a scoring forward's prompts).
    pub shared: Option<Sharing>,
}

impl SeqContext {
    /// The tables of the first `len` positions (RoPE rows and mask blocks are prefixes: a
    /// query at i sees keys by i and j alone).
    fn prefix(&self, len: usize, heads: usize) -> Result<Self> {
        let rows = |t: &Tensor| t.narrow(0, 0, len);
        let block = |m: &Tensor| -> candle_core::Result<Tensor> { rows(m)?.narrow(1, 0, len) };
        Ok(Self {
            len,
            cos: rows(&self.cos)?,
            sin: rows(&self.sin)?,
            mask: block(&self.mask)?,
            sliding_mask: self.sliding_mask.as_ref().map(block).transpose()?,
            local_rope: match &self.local_rope {
                Some((c, s)) => Some((rows(c)?, rows(s)?)),
                None => None,
            },
            attn_seqs: attention_chunk(heads, len, self.cos.device()),
            dropout: None,
            segments: None,
            shared: None,
        })
    }

    /// The tables of one row that packs sequences of `lens` end to end (this context covers the
    /// longest): RoPE at each token's position within its own sequence; the masks stay [T, T],
    /// and each sequence takes their prefix.
    pub fn packed(&self, lens: &[usize]) -> Result<Self> {
        let positions = lens.iter().flat_map(|&n| 0..n as u32).collect();
        self.laid_out(positions, lens, None)
    }

    /// The tables of a packed row whose sequences share first positions ([`Sharing`]): RoPE at
    /// each own row's position after the shared ones. A scoring forward's only: no dropout.
    pub fn sharing(&self, sharing: Sharing) -> Result<Self> {
        if self.dropout.is_some() {
            return Err(crate::error::Error::Model(
                "shared first positions are for a scoring forward, which has no dropout".into(),
            ));
        }
        self.laid_out(sharing.positions.clone(), &sharing.lens(), Some(sharing))
    }

    fn laid_out(
        &self,
        positions: Vec<u32>,
        lens: &[usize],
        shared: Option<Sharing>,
    ) -> Result<Self> {
        let longest = lens.iter().copied().max().unwrap_or(0);
        if longest > self.len {
            return Err(crate::error::Error::Model(format!(
                "a packed sequence of {longest} positions exceeds the tables' {}",
                self.len
            )));
        }
        let n = positions.len();
        let positions = Tensor::from_vec(positions, n, self.cos.device())?;
        let at = |t: &Tensor| t.index_select(&positions, 0);
        Ok(Self {
            len: self.len,
            cos: at(&self.cos)?,
            sin: at(&self.sin)?,
            mask: self.mask.clone(),
            sliding_mask: self.sliding_mask.clone(),
            local_rope: match &self.local_rope {
                Some((c, s)) => Some((at(c)?, at(s)?)),
                None => None,
            },
            attn_seqs: 1,
            dropout: self.dropout.clone().map(|d| Dropout {
                segments: Some(lens.into()),
                ..d
            }),
            segments: Some(lens.into()),
            shared,
        })
    }

    /// The RoPE tables and the mask of a layer that slides or not.
    pub(super) fn for_layer(&self, sliding: bool) -> ((&Tensor, &Tensor), &Tensor) {
        let rope = match (&self.local_rope, sliding) {
            (Some((c, s)), true) => (c, s),
            _ => (&self.cos, &self.sin),
        };
        let mask = match (&self.sliding_mask, sliding) {
            (Some(m), true) => m,
            _ => &self.mask,
        };
        (rope, mask)
    }
}

/// The tables of the longest sequence length seen, narrowed for shorter ones: built once per
/// model and device rather than on the host at every forward.
#[derive(Debug, Clone, Default)]
pub struct ContextCache(std::sync::Arc<std::sync::Mutex<Option<SeqContext>>>);

impl ContextCache {
    pub fn get(&self, model: &Transformer, seq_len: usize, device: &Device) -> Result<SeqContext> {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let fits = slot
            .as_ref()
            .is_some_and(|c| c.len >= seq_len && c.cos.device().same_device(device));
        if !fits {
            *slot = Some(model.build_context(seq_len, device)?);
        }
        slot.as_ref()
            .expect("built above")
            .prefix(seq_len, model.cfg.num_heads)
    }
}

/// [T, T] additive mask: keys j <= i within `window` positions (i - window < j).
pub(super) fn additive_mask(seq_len: usize, window: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..seq_len)
        .flat_map(|i| {
            (0..seq_len).map(move |j| {
                if j > i || i - j >= window {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (seq_len, seq_len), device)?)
}

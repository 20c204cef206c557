//! The decoder (Llama, Mistral, Qwen2, Qwen3, OLMo 2, Phi-3, Gemma 2/3) as plain candle modules:
//! one forward for the frozen reference and for the policy. The ops that candle fuses without a
//! backward (`softmax_last_dim`, `rms_norm`, `rope`: they would silently train nothing but
//! `lm_head`) are composed from differentiable primitives for the policy on the CPU; on CUDA both
//! use refdpo's own fused ops, which have their backward ([`super::fused`]).

use super::attention::attention_chunk;
use super::block::Block;
use super::config::TransformerConfig;
use super::norm::RmsNorm;
use super::params::ParamSource;
use super::rope::Rope;
use super::tables::{additive_mask, ContextCache, SeqContext};
use super::OpMode;
use crate::error::Result;
use crate::profile::{self, Phase};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Embedding;

/// The whole decoder, with the `lm_head` weight kept apart for chunked log-probs.
#[derive(Debug, Clone)]
pub struct Transformer {
    pub cfg: TransformerConfig,
    pub(super) embed: Embedding,
    pub blocks: Vec<Block>,
    pub(super) final_norm: RmsNorm,
    /// [V, H]; the embedding matrix itself when tied.
    pub lm_head: Tensor,
    pub(super) rope: Rope,
    /// Gemma 3: the sliding layers' RoPE (its own base).
    pub(super) local_rope: Option<Rope>,
    pub(super) dtype: DType,
    pub(super) contexts: ContextCache,
}

impl Transformer {
    /// Builds the model from HF-named tensors (already in the compute dtype).
    pub fn new(cfg: &TransformerConfig, p: &dyn ParamSource) -> Result<Self> {
        let mut model = Self::shell(cfg, p)?;
        model.blocks = (0..cfg.num_layers)
            .map(|i| Block::load(cfg, p, i))
            .collect::<Result<Vec<_>>>()?;
        Ok(model)
    }

    /// Everything but the blocks (embedding, final norm, `lm_head`): the policy loads its blocks
    /// one at a time with [`Block::load`], so only one block's compute copy exists at once.
    pub fn shell(cfg: &TransformerConfig, p: &dyn ParamSource) -> Result<Self> {
        let embed_w = p.get("model.embed_tokens.weight")?;
        let dtype = embed_w.dtype();
        let lm_head = if cfg.tie_word_embeddings {
            embed_w.clone()
        } else {
            p.get("lm_head.weight")?
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed: Embedding::new(embed_w, cfg.hidden_size),
            blocks: Vec::new(),
            final_norm: RmsNorm::for_family(cfg, p.get("model.norm.weight")?)?,
            lm_head,
            rope: Rope::new(&cfg.rope, cfg.head_dim),
            local_rope: cfg.local_rope.as_ref().map(|r| Rope::new(r, cfg.head_dim)),
            dtype,
            contexts: ContextCache::default(),
        })
    }

    /// The tables of `seq_len` positions (cached: see [`ContextCache`]).
    pub fn context(&self, seq_len: usize, device: &Device) -> Result<SeqContext> {
        self.contexts.get(self, seq_len, device)
    }

    pub(super) fn build_context(&self, seq_len: usize, device: &Device) -> Result<SeqContext> {
        let (cos, sin) = self.rope.tables(seq_len, self.dtype, device)?;
        let slides = self.cfg.sliding_layers.iter().any(|&s| s);
        let sliding_mask = match self.cfg.sliding_window {
            Some(w) if slides && w < seq_len => Some(additive_mask(seq_len, w, device)?),
            _ => None,
        };
        let local_rope = match &self.local_rope {
            Some(r) if slides => Some(r.tables(seq_len, self.dtype, device)?),
            _ => None,
        };
        Ok(SeqContext {
            len: seq_len,
            cos,
            sin,
            mask: additive_mask(seq_len, usize::MAX, device)?,
            sliding_mask,
            local_rope,
            attn_seqs: attention_chunk(self.cfg.num_heads, seq_len, device),
            dropout: None,
            segments: None,
            shared: None,
        })
    }

    /// input_ids [B, T] (u32) → embeddings [B, T, H]
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let _phase = profile::scope(Phase::Embedding);
        let x = self.embed.forward(input_ids)?;
        match Self::embed_scale(&self.cfg, x.dtype(), x.device())? {
            Some(scale) => Ok(x.broadcast_mul(&scale)?),
            None => Ok(x),
        }
    }

    /// The factor the embedding lookup is scaled by, in `dtype` (the lookup's; the policy's
    /// backward scales its gradient by the same rounded value): Gemma's √hidden, rounded to the
    /// weights' dtype as transformers does; none for the other families.
    pub fn embed_scale(
        cfg: &TransformerConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<Tensor>> {
        if !cfg.gemma {
            return Ok(None);
        }
        let scale = Tensor::new((cfg.hidden_size as f32).sqrt(), device)?.to_dtype(dtype)?;
        Ok(Some(scale))
    }

    /// hidden [B, T, H] → final-normed hidden [B, T, H]
    pub fn final_norm(&self, x: &Tensor, mode: OpMode) -> Result<Tensor> {
        self.final_norm.forward(x, mode)
    }

    /// input_ids [B, T] → final hidden states [B, T, H]. Right padding needs no mask beyond the
    /// causal one: real tokens never attend to the pads that follow them.
    pub fn forward_hidden(&self, input_ids: &Tensor, mode: OpMode) -> Result<Tensor> {
        let (_, t) = input_ids.dims2()?;
        let ctx = self.context(t, input_ids.device())?;
        self.forward_hidden_in(&ctx, input_ids, mode)
    }

    /// [`Self::forward_hidden`] with a given context (its attention chunking included).
    pub fn forward_hidden_in(
        &self,
        ctx: &SeqContext,
        input_ids: &Tensor,
        mode: OpMode,
    ) -> Result<Tensor> {
        let mut x = self.embed(input_ids)?;
        for block in &self.blocks {
            x = block.forward(&x, ctx, mode)?;
        }
        self.final_norm(&x, mode)
    }

    /// input_ids [B, T] → logits [B, T, V] (tests and small inputs only: this is the full vocabulary).
    pub fn forward_logits(&self, input_ids: &Tensor, mode: OpMode) -> Result<Tensor> {
        let h = self.forward_hidden(input_ids, mode)?;
        super::softcap(
            h.broadcast_matmul(&self.lm_head.t()?)?,
            self.cfg.final_softcap,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init;

    /// Grouped-query attention without repeated K/V, the sliding window and every fused op
    /// in a whole forward: as the composed ops.
    #[test]
    fn fused_forward_equals_the_composed_one() {
        for (arch, window) in [("qwen2", ""), ("mistral", r#","sliding_window":3"#)] {
            let cfg = TransformerConfig::from_json(&format!(
                r#"{{"model_type":"{arch}","vocab_size":29,"hidden_size":16,
                "intermediate_size":24,"num_hidden_layers":2,"num_attention_heads":4,
                "num_key_value_heads":2,"rms_norm_eps":1e-6,"rope_theta":10000.0{window}}}"#
            ))
            .unwrap();
            let w = init::init_weights(&cfg, 7, 0.3).unwrap();
            let model = Transformer::new(&cfg, &w).unwrap();
            let ids = Tensor::new(&[[1u32, 5, 7, 2, 9], [3, 3, 8, 0, 0]], &Device::Cpu).unwrap();
            let want = model.forward_hidden(&ids, OpMode::Differentiable).unwrap();
            let got = model.forward_hidden(&ids, OpMode::Fused).unwrap();
            let diff = crate::test_util::max_abs_diff(&want, &got);
            assert!(diff < 1e-5, "{arch}: {diff}");
        }
    }

    /// The scoring forward's causal attention in query blocks (sequences past one block, a
    /// sliding window across blocks, Gemma 2's soft cap): as the composed dense attention.
    #[test]
    fn query_blocks_equal_the_dense_attention() {
        for (arch, extra) in [
            ("llama", ""),
            ("mistral", r#","sliding_window":37"#),
            (
                "gemma2",
                r#","sliding_window":37,"query_pre_attn_scalar":4,"attn_logit_softcapping":5.0,
                "hidden_activation":"gelu_pytorch_tanh""#,
            ),
        ] {
            let cfg = TransformerConfig::from_json(&format!(
                r#"{{"model_type":"{arch}","vocab_size":29,"hidden_size":16,
                "intermediate_size":24,"num_hidden_layers":2,"num_attention_heads":4,
                "num_key_value_heads":2,"rms_norm_eps":1e-6,"rope_theta":10000.0{extra}}}"#
            ))
            .unwrap();
            let model = Transformer::new(&cfg, &init::init_weights(&cfg, 3, 0.3).unwrap()).unwrap();
            let t = 2 * super::super::attention::QUERY_BLOCK + 19;
            let ids: Vec<u32> = (0..2 * t as u32).map(|i| (i * 11 + 3) % 29).collect();
            let ids = Tensor::from_vec(ids, (2, t), &Device::Cpu).unwrap();
            let want = model.forward_hidden(&ids, OpMode::Differentiable).unwrap();
            let got = model.forward_hidden(&ids, OpMode::Fast).unwrap();
            let diff = crate::test_util::max_abs_diff(&want, &got);
            assert!(diff < 1e-5, "{arch}: {diff}");
        }
    }

    #[test]
    fn chunked_attention_equals_one_chunk() {
        let cfg = TransformerConfig::from_json(
            r#"{"model_type":"qwen2","vocab_size":29,"hidden_size":16,"intermediate_size":24,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "rms_norm_eps":1e-6,"rope_theta":10000.0,"tie_word_embeddings":true}"#,
        )
        .unwrap();
        let model = Transformer::new(&cfg, &init::init_weights(&cfg, 7, 0.3).unwrap()).unwrap();
        let ids = Tensor::new(
            &[[1u32, 5, 7, 2, 9], [3, 3, 8, 0, 0], [4, 1, 1, 6, 2]],
            &Device::Cpu,
        )
        .unwrap();
        let mut ctx = model.context(5, &Device::Cpu).unwrap();
        assert!(ctx.attn_seqs >= 3, "one chunk for a tiny batch");
        for mode in [OpMode::Fast, OpMode::Differentiable, OpMode::Fused] {
            ctx.attn_seqs = 3;
            let whole = model.forward_hidden_in(&ctx, &ids, mode).unwrap();
            for seqs in [1, 2] {
                ctx.attn_seqs = seqs;
                let chunked = model.forward_hidden_in(&ctx, &ids, mode).unwrap();
                let diff = crate::test_util::max_abs_diff(&whole, &chunked);
                assert!(
                    diff < 1e-6,
                    "{mode:?} with {seqs} sequences per chunk: {diff}"
                );
            }
        }
        assert_eq!(attention_chunk(32, 1024, &Device::Cpu), 1);
        assert_eq!(attention_chunk(2, 256, &Device::Cpu), 16);
    }

    #[test]
    fn cached_tables_narrowed_equal_fresh_ones() {
        let cfg = TransformerConfig::from_json(
            r#"{"model_type":"mistral","vocab_size":29,"hidden_size":16,"intermediate_size":24,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "rms_norm_eps":1e-6,"rope_theta":10000.0,"sliding_window":3}"#,
        )
        .unwrap();
        let model = Transformer::new(&cfg, &init::init_weights(&cfg, 7, 0.3).unwrap()).unwrap();
        let dev = Device::Cpu;
        model.context(9, &dev).unwrap(); // the cache now holds 9 positions
        let (cached, fresh) = (
            model.context(5, &dev).unwrap(),
            model.build_context(5, &dev).unwrap(),
        );
        let same = |a: &Tensor, b: &Tensor| {
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(a.dims(), b.dims());
            assert_eq!(flat(a), flat(b));
        };
        same(&cached.cos, &fresh.cos);
        same(&cached.sin, &fresh.sin);
        same(&cached.mask, &fresh.mask);
        same(
            cached.sliding_mask.as_ref().unwrap(),
            fresh.sliding_mask.as_ref().unwrap(),
        );
        assert_eq!((cached.len, cached.attn_seqs), (fresh.len, fresh.attn_seqs));
        // a longer length rebuilds
        assert_eq!(model.context(12, &dev).unwrap().mask.dims(), &[12, 12]);
    }
}

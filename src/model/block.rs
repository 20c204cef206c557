//! One decoder layer: attention and MLP, each with its residual, normed where the family norms
//! (before, after, or both).

use super::attention::{Attention, KeepKv};
use super::kv_cache::LayerKv;
use super::lora::Dropout;
use super::mlp::Mlp;
use super::norm::RmsNorm;
use super::tables::SeqContext;
use super::OpMode;
use crate::error::Result;
use candle_core::{DType, Device, Tensor};

/// Where a layer's two norms sit.
#[derive(Debug, Clone)]
pub(super) enum Norms {
    /// x + attn(input(x)), then h + mlp(post_attention(h)) (Llama, Mistral, Qwen).
    Pre {
        input: RmsNorm,
        post_attention: RmsNorm,
    },
    /// x + post_attention(attn(x)), then h + post_feedforward(mlp(h)) (OLMo 2).
    Post {
        post_attention: RmsNorm,
        post_feedforward: RmsNorm,
    },
    /// x + post_attention(attn(input(x))), then h + post_feedforward(mlp(pre_feedforward(h)))
    /// (Gemma).
    Sandwich {
        input: RmsNorm,
        post_attention: RmsNorm,
        pre_feedforward: RmsNorm,
        post_feedforward: RmsNorm,
    },
}

/// One decoder layer: attention and MLP, each with its residual, normed as the family does.
#[derive(Debug, Clone)]
pub struct Block {
    pub(super) norms: Norms,
    pub(super) attn: Attention,
    pub(super) mlp: Mlp,
}

impl Block {
    /// Whether a forward of `tokens` positions keeps no [T, T] attention scores (see
    /// [`Attention::scores_free`]).
    pub fn scores_free(&self, device: &Device, dtype: DType, tokens: usize, mode: OpMode) -> bool {
        self.attn.scores_free(device, dtype, tokens, mode)
    }

    /// x: [B, T, H] → [B, T, H]
    pub fn forward(&self, x: &Tensor, ctx: &SeqContext, mode: OpMode) -> Result<Tensor> {
        let attend = |h: &Tensor| self.attn.forward(h, ctx, mode);
        self.forward_with(x, mode, ctx.dropout.as_ref(), &attend)
    }

    /// [`Self::forward`] of a decoding run's prefill (no dropout), handing each layer's keys and
    /// values after RoPE to `keep`.
    pub(super) fn forward_keeping(
        &self,
        x: &Tensor,
        ctx: &SeqContext,
        keep: &mut KeepKv,
    ) -> Result<Tensor> {
        let keep = std::cell::RefCell::new(keep);
        let attend = |h: &Tensor| {
            let mut keep = keep.borrow_mut();
            self.attn
                .forward_keeping(h, ctx, OpMode::Fast, Some(&mut **keep))
        };
        self.forward_with(x, OpMode::Fast, None, &attend)
    }

    /// The new positions x [B, t, H] of an incremental forward (see
    /// [`Transformer::forward_cached`]).
    pub(super) fn forward_cached(
        &self,
        x: &Tensor,
        rope: (&Tensor, &Tensor),
        mask: &Tensor,
        kv: &mut Option<LayerKv>,
        capacity: usize,
    ) -> Result<Tensor> {
        let kv = std::cell::RefCell::new(kv);
        let attend = |h: &Tensor| {
            self.attn
                .forward_cached(h, rope, mask, &mut kv.borrow_mut(), capacity)
        };
        self.forward_with(x, OpMode::Fast, None, &attend)
    }

    /// The residual structure of the family's norms around `attend` and the MLP.
    fn forward_with(
        &self,
        x: &Tensor,
        mode: OpMode,
        dropout: Option<&Dropout>,
        attend: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        match &self.norms {
            Norms::Pre {
                input,
                post_attention,
            } => {
                let h = input.forward(x, mode)?;
                let x = (x + attend(&h)?)?;
                let h = post_attention.forward(&x, mode)?;
                Ok((&x + self.mlp.forward(&h, dropout, mode)?)?)
            }
            Norms::Post {
                post_attention,
                post_feedforward,
            } => {
                let a = post_attention.forward(&attend(x)?, mode)?;
                let x = (x + a)?;
                let m = post_feedforward.forward(&self.mlp.forward(&x, dropout, mode)?, mode)?;
                Ok((&x + m)?)
            }
            Norms::Sandwich {
                input,
                post_attention,
                pre_feedforward,
                post_feedforward,
            } => {
                let a = attend(&input.forward(x, mode)?)?;
                let x = (x + post_attention.forward(&a, mode)?)?;
                let m = self
                    .mlp
                    .forward(&pre_feedforward.forward(&x, mode)?, dropout, mode)?;
                Ok((&x + post_feedforward.forward(&m, mode)?)?)
            }
        }
    }
}

//! Each family's weight names and how they make a layer: norms by where the family puts them,
//! separate or fused (Phi-3) projections with their adapters, query/key norms. The names are
//! those of [`super::shapes::expected`], which checks a folder before any of this runs.

use super::attention::Attention;
use super::block::{Block, Norms};
use super::config::{QkNorm, TransformerConfig};
use super::lora::{Adapter, Proj};
use super::mlp::Mlp;
use super::norm::RmsNorm;
use super::params::{linear, ParamSource};
use crate::error::Result;
use candle_core::Tensor;
use candle_nn::Linear;

impl Block {
    /// Layer `i`'s weights from `p` (the policy loads one block at a time this way).
    pub fn load(cfg: &TransformerConfig, p: &dyn ParamSource, i: usize) -> Result<Self> {
        let pre = format!("model.layers.{i}");
        let norm = |name: &str| -> Result<RmsNorm> {
            RmsNorm::for_family(cfg, p.get(&format!("{pre}.{name}.weight"))?)
        };
        let norms = if cfg.gemma {
            Norms::Sandwich {
                input: norm("input_layernorm")?,
                post_attention: norm("post_attention_layernorm")?,
                pre_feedforward: norm("pre_feedforward_layernorm")?,
                post_feedforward: norm("post_feedforward_layernorm")?,
            }
        } else if cfg.post_norms {
            Norms::Post {
                post_attention: norm("post_attention_layernorm")?,
                post_feedforward: norm("post_feedforward_layernorm")?,
            }
        } else {
            Norms::Pre {
                input: norm("input_layernorm")?,
                post_attention: norm("post_attention_layernorm")?,
            }
        };
        let ((q, k, v), (gate, up)) = if cfg.fused_projections {
            // Phi-3: rows [q | k | v] and [gate | up]; `narrow` keeps the fused tensor the one
            // trained parameter (its gradient gathers the parts').
            let (nq, nkv) = (
                cfg.num_heads * cfg.head_dim,
                cfg.num_kv_heads * cfg.head_dim,
            );
            // An adapter of a fused projection is split the same way (its B by rows); the parts
            // share the module's dropout mask, as PEFT's one adapter on the fused input does.
            let fused = |module: String| -> Result<(Tensor, Option<Adapter>, String)> {
                Ok((
                    p.get(&format!("{module}.weight"))?,
                    p.adapter(&module)?,
                    module,
                ))
            };
            let part = |(w, ad, module): &(Tensor, Option<Adapter>, String),
                        at: usize,
                        n: usize|
             -> Result<Proj> {
                let ad = ad.as_ref().map(|a| a.narrow_out(at, n)).transpose()?;
                Ok(Proj::new(
                    Linear::new(w.narrow(0, at, n)?, None),
                    ad,
                    module,
                ))
            };
            let qkv = fused(format!("{pre}.self_attn.qkv_proj"))?;
            let gate_up = fused(format!("{pre}.mlp.gate_up_proj"))?;
            let i = cfg.intermediate_size;
            (
                (
                    part(&qkv, 0, nq)?,
                    part(&qkv, nq, nkv)?,
                    part(&qkv, nq + nkv, nkv)?,
                ),
                (part(&gate_up, 0, i)?, part(&gate_up, i, i)?),
            )
        } else {
            let attn = |n: &str| linear(p, &format!("{pre}.self_attn.{n}"), cfg.qkv_bias);
            let mlp = |n: &str| linear(p, &format!("{pre}.mlp.{n}"), cfg.mlp_bias);
            (
                (attn("q_proj")?, attn("k_proj")?, attn("v_proj")?),
                (mlp("gate_proj")?, mlp("up_proj")?),
            )
        };
        let sliding = cfg.sliding_layers.get(i).copied().unwrap_or(false);
        let qk_norm = match cfg.qk_norm {
            QkNorm::None => None,
            kind => Some((kind, norm("self_attn.q_norm")?, norm("self_attn.k_norm")?)),
        };
        Ok(Self {
            norms,
            attn: Attention {
                q,
                k,
                v,
                o: linear(p, &format!("{pre}.self_attn.o_proj"), cfg.o_bias)?,
                qk_norm,
                scale: cfg.attn_scale,
                softcap: cfg.attn_softcap,
                sliding,
                window: if sliding {
                    cfg.sliding_window.unwrap_or(0)
                } else {
                    0
                },
                num_heads: cfg.num_heads,
                num_kv_heads: cfg.num_kv_heads,
                head_dim: cfg.head_dim,
            },
            mlp: Mlp {
                gate,
                up,
                down: linear(p, &format!("{pre}.mlp.down_proj"), cfg.mlp_bias)?,
                activation: cfg.activation,
            },
        })
    }
}

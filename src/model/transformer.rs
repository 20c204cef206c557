//! The decoder (Llama / Qwen2) as plain candle modules: one forward for the frozen reference
//! (fast fused ops) and for the policy (differentiable ops only: candle's fused `softmax_last_dim`,
//! `rms_norm` and `rope` have no backward and would silently train nothing but `lm_head`).

use super::config::TransformerConfig;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, Linear};

/// Which implementation of the fused ops a forward uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpMode {
    /// candle's fused kernels; no gradients (reference forward).
    Fast,
    /// Composed from differentiable primitives (policy forward).
    Differentiable,
}

/// Where a model's tensors come from: named HF tensors in the compute dtype.
pub trait ParamSource {
    fn get(&self, name: &str) -> Result<Tensor>;
}

impl ParamSource for std::collections::HashMap<String, Tensor> {
    fn get(&self, name: &str) -> Result<Tensor> {
        self.get(name)
            .cloned()
            .ok_or_else(|| Error::Model(format!("tensor `{name}` is missing from the weights")))
    }
}

fn linear(p: &dyn ParamSource, prefix: &str, bias: bool) -> Result<Linear> {
    let w = p.get(&format!("{prefix}.weight"))?;
    let b = if bias {
        Some(p.get(&format!("{prefix}.bias"))?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}

/// RMSNorm as in HF: normalize in f32, cast back, scale.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor, mode: OpMode) -> Result<Tensor> {
        Ok(match mode {
            OpMode::Fast => candle_nn::ops::rms_norm(x, &self.weight, self.eps)?,
            OpMode::Differentiable => candle_nn::ops::rms_norm_slow(x, &self.weight, self.eps)?,
        })
    }
}

/// RoPE cos/sin tables [T, head_dim/2], computed in f32 as HF does, then cast.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(cfg: &TransformerConfig) -> Self {
        let dim = cfg.head_dim;
        let mut inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / cfg.rope_theta.powf(i as f32 / dim as f32))
            .collect();
        if let Some(s) = &cfg.rope_scaling {
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
        Self { inv_freq }
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

#[derive(Debug, Clone)]
pub struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// x: [B, T, H]; cos/sin: [T, hd/2]; mask: [T, T] additive causal → [B, T, H]
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        mode: OpMode,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let heads = |lin: &Linear, n: usize| -> Result<Tensor> {
            // [B, T, n*hd] → [B, n, T, hd]
            Ok(lin
                .forward(x)?
                .reshape((b, t, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = heads(&self.q, self.num_heads)?;
        let k = heads(&self.k, self.num_kv_heads)?;
        let v = heads(&self.v, self.num_kv_heads)?;
        let (q, k) = match mode {
            OpMode::Fast => (
                candle_nn::rotary_emb::rope(&q, cos, sin)?,
                candle_nn::rotary_emb::rope(&k, cos, sin)?,
            ),
            OpMode::Differentiable => (
                candle_nn::rotary_emb::rope_slow(&q, cos, sin)?,
                candle_nn::rotary_emb::rope_slow(&k, cos, sin)?,
            ),
        };
        let rep = self.num_heads / self.num_kv_heads;
        let k = repeat_kv(k, rep)?;
        let v = repeat_kv(v, rep)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        // scores [B, nh, T, T], softmax in f32 as HF's eager attention does.
        let scores = (q.matmul(&k.t()?)? * scale)?
            .to_dtype(DType::F32)?
            .broadcast_add(mask)?;
        let probs = match mode {
            OpMode::Fast => candle_nn::ops::softmax_last_dim(&scores)?,
            OpMode::Differentiable => candle_nn::ops::softmax(&scores, D::Minus1)?,
        }
        .to_dtype(v.dtype())?;
        // [B, nh, T, hd] → [B, T, nh*hd]
        let out =
            probs
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((b, t, self.num_heads * self.head_dim))?;
        Ok(self.o.forward(&out)?)
    }
}

fn repeat_kv(x: Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x);
    }
    let (b, n, t, d) = x.dims4()?;
    // [B, n, T, d] → [B, n, rep, T, d] → [B, n*rep, T, d]
    Ok(x.unsqueeze(2)?
        .expand((b, n, rep, t, d))?
        .reshape((b, n * rep, t, d))?)
}

#[derive(Debug, Clone)]
pub struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = (self.gate.forward(x)?.silu()? * self.up.forward(x)?)?;
        Ok(self.down.forward(&h)?)
    }
}

/// One decoder layer: x + attn(norm(x)), then + mlp(norm(x)).
#[derive(Debug, Clone)]
pub struct Block {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    fn new(cfg: &TransformerConfig, p: &dyn ParamSource, i: usize) -> Result<Self> {
        let pre = format!("model.layers.{i}");
        let eps = cfg.rms_norm_eps as f32;
        let norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: p.get(&format!("{pre}.{name}.weight"))?,
                eps,
            })
        };
        Ok(Self {
            input_norm: norm("input_layernorm")?,
            post_norm: norm("post_attention_layernorm")?,
            attn: Attention {
                q: linear(p, &format!("{pre}.self_attn.q_proj"), cfg.qkv_bias)?,
                k: linear(p, &format!("{pre}.self_attn.k_proj"), cfg.qkv_bias)?,
                v: linear(p, &format!("{pre}.self_attn.v_proj"), cfg.qkv_bias)?,
                o: linear(p, &format!("{pre}.self_attn.o_proj"), cfg.o_bias)?,
                num_heads: cfg.num_heads,
                num_kv_heads: cfg.num_kv_heads,
                head_dim: cfg.head_dim,
            },
            mlp: Mlp {
                gate: linear(p, &format!("{pre}.mlp.gate_proj"), cfg.mlp_bias)?,
                up: linear(p, &format!("{pre}.mlp.up_proj"), cfg.mlp_bias)?,
                down: linear(p, &format!("{pre}.mlp.down_proj"), cfg.mlp_bias)?,
            },
        })
    }

    /// x: [B, T, H] → [B, T, H]
    pub fn forward(&self, x: &Tensor, ctx: &SeqContext, mode: OpMode) -> Result<Tensor> {
        let h = self.input_norm.forward(x, mode)?;
        let x = (x + self.attn.forward(&h, &ctx.cos, &ctx.sin, &ctx.mask, mode)?)?;
        let h = self.post_norm.forward(&x, mode)?;
        Ok((&x + self.mlp.forward(&h)?)?)
    }
}

/// Per-sequence-length tables shared by every block of one forward.
pub struct SeqContext {
    pub cos: Tensor,
    pub sin: Tensor,
    /// [T, T] additive causal mask in f32 (0 on and below the diagonal, -inf above).
    pub mask: Tensor,
}

/// The whole decoder, with the `lm_head` weight kept apart for chunked log-probs.
#[derive(Debug, Clone)]
pub struct Transformer {
    pub cfg: TransformerConfig,
    embed: Embedding,
    pub blocks: Vec<Block>,
    final_norm: RmsNorm,
    /// [V, H]; the embedding matrix itself when tied.
    pub lm_head: Tensor,
    rope: Rope,
    dtype: DType,
}

impl Transformer {
    /// Builds the model from HF-named tensors (already in the compute dtype).
    pub fn new(cfg: &TransformerConfig, p: &dyn ParamSource) -> Result<Self> {
        let embed_w = p.get("model.embed_tokens.weight")?;
        let dtype = embed_w.dtype();
        let lm_head = if cfg.tie_word_embeddings {
            embed_w.clone()
        } else {
            p.get("lm_head.weight")?
        };
        let blocks = (0..cfg.num_layers)
            .map(|i| Block::new(cfg, p, i))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            embed: Embedding::new(embed_w, cfg.hidden_size),
            blocks,
            final_norm: RmsNorm {
                weight: p.get("model.norm.weight")?,
                eps: cfg.rms_norm_eps as f32,
            },
            lm_head,
            rope: Rope::new(cfg),
            dtype,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn context(&self, seq_len: usize, device: &Device) -> Result<SeqContext> {
        let (cos, sin) = self.rope.tables(seq_len, self.dtype, device)?;
        let mask: Vec<f32> = (0..seq_len)
            .flat_map(|i| (0..seq_len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (seq_len, seq_len), device)?;
        Ok(SeqContext { cos, sin, mask })
    }

    /// input_ids [B, T] (u32) → embeddings [B, T, H]
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        Ok(self.embed.forward(input_ids)?)
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
        let mut x = self.embed(input_ids)?;
        for block in &self.blocks {
            x = block.forward(&x, &ctx, mode)?;
        }
        self.final_norm(&x, mode)
    }

    /// input_ids [B, T] → logits [B, T, V] (tests and small inputs only: this is the full vocabulary).
    pub fn forward_logits(&self, input_ids: &Tensor, mode: OpMode) -> Result<Tensor> {
        let h = self.forward_hidden(input_ids, mode)?;
        Ok(h.broadcast_matmul(&self.lm_head.t()?)?)
    }
}

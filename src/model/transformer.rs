//! The decoder (Llama, Mistral, Qwen2, Qwen3, OLMo 2, Phi-3, Gemma 2/3) as plain candle modules:
//! one forward for the frozen reference and for the policy. The ops that candle fuses without a
//! backward (`softmax_last_dim`, `rms_norm`, `rope`: they would silently train nothing but
//! `lm_head`) are composed from differentiable primitives for the policy on the CPU; on CUDA both
//! use refdpo's own fused ops, which have their backward ([`super::fused`]).

use super::config::{Activation, QkNorm, TransformerConfig};
use super::fused::{self, AttnSoftmax};
use super::lora::{Adapter, Dropout, Proj};
use crate::error::{Error, Result};
use crate::profile::{self, Phase};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, Linear};

/// Which implementation of the fused ops a forward uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpMode {
    /// candle's fused kernels; no gradients (reference forward).
    Fast,
    /// Composed from differentiable primitives (policy forward).
    Differentiable,
    /// refdpo's fused ops, differentiable ([`fused`]); where one does not apply (Gemma's GELU,
    /// Gemma 2's attention soft cap), the composed ops.
    Fused,
}

impl OpMode {
    /// For a frozen model's forward on `device`.
    pub fn scoring(device: &Device) -> Self {
        if fused::enabled(device) {
            Self::Fused
        } else {
            Self::Fast
        }
    }

    /// For a forward whose backward is taken, on `device`.
    pub fn training(device: &Device) -> Self {
        if fused::enabled(device) {
            Self::Fused
        } else {
            Self::Differentiable
        }
    }
}

/// Where a model's tensors come from: named HF tensors in the compute dtype, and LoRA adapters
/// of projections (by HF module name) where there are any.
pub trait ParamSource {
    fn get(&self, name: &str) -> Result<Tensor>;

    fn adapter(&self, _module: &str) -> Result<Option<Adapter>> {
        Ok(None)
    }
}

impl ParamSource for std::collections::HashMap<String, Tensor> {
    fn get(&self, name: &str) -> Result<Tensor> {
        self.get(name)
            .cloned()
            .ok_or_else(|| Error::Model(format!("tensor `{name}` is missing from the weights")))
    }
}

fn linear(p: &dyn ParamSource, prefix: &str, bias: bool) -> Result<Proj> {
    let w = p.get(&format!("{prefix}.weight"))?;
    let b = if bias {
        Some(p.get(&format!("{prefix}.bias"))?)
    } else {
        None
    };
    Ok(Proj::new(Linear::new(w, b), p.adapter(prefix)?, prefix))
}

/// Upper bound on the elements of one chunk of attention scores (sequences × heads × T × T):
/// bounds activation memory and stays far below candle's 32-bit CUDA element count. On the CPU
/// the chunk is kept small (8 MiB of f32): larger fresh buffers are mmapped and page-faulted anew
/// on every chunk (measured in BENCHMARKS.md, "CPU page faults").
fn scores_budget(device: &Device) -> usize {
    if device.is_cpu() {
        1 << 21
    } else {
        1 << 25
    }
}

/// Sequences per attention chunk for `heads` heads over `seq_len` positions on `device` (at
/// least one).
pub fn attention_chunk(heads: usize, seq_len: usize, device: &Device) -> usize {
    (scores_budget(device) / (heads * seq_len * seq_len).max(1)).max(1)
}

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
        if mode == OpMode::Fused {
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
            _ => candle_nn::ops::rms_norm_slow(x, &self.weight, self.eps)?,
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

#[derive(Debug, Clone)]
pub struct Attention {
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    /// RMSNorm of queries and keys before RoPE (Qwen3 per head, OLMo 2 whole).
    qk_norm: Option<(QkNorm, RmsNorm, RmsNorm)>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    /// The scores' scale (1/√head_dim, or Gemma's `query_pre_attn_scalar`^-½).
    scale: f64,
    /// Gemma 2: cap · tanh(scores / cap), after the scale and before the mask.
    softcap: Option<f64>,
    /// This layer attends within the sliding window (with the local RoPE base, if any).
    sliding: bool,
    /// That window's length (0 for none).
    window: usize,
}

impl Attention {
    /// x [B, T, H] → q [B, nh, T, hd], k and v [B, kv, T, hd], before RoPE, with the query/key
    /// norm where the family has one.
    fn project(
        &self,
        x: &Tensor,
        dropout: Option<&Dropout>,
        mode: OpMode,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let heads = |lin: &Proj, n: usize, norm: Option<&RmsNorm>| -> Result<Tensor> {
            let mut y = lin.forward(x, dropout)?;
            let kind = self.qk_norm.as_ref().map(|(k, _, _)| *k);
            if let (Some(QkNorm::Whole), Some(norm)) = (kind, norm) {
                y = norm.forward(&y, mode)?;
            }
            let mut y = y.reshape((b, t, n, self.head_dim))?;
            if let (Some(QkNorm::PerHead), Some(norm)) = (kind, norm) {
                y = norm.forward(&y, mode)?;
            }
            Ok(y.transpose(1, 2)?.contiguous()?)
        };
        let (q_norm, k_norm) = match &self.qk_norm {
            Some((_, q, k)) => (Some(q), Some(k)),
            None => (None, None),
        };
        Ok((
            heads(&self.q, self.num_heads, q_norm)?,
            heads(&self.k, self.num_kv_heads, k_norm)?,
            heads(&self.v, self.num_kv_heads, None)?,
        ))
    }

    /// x: [B, T, H] → [B, T, H]
    fn forward(&self, x: &Tensor, ctx: &SeqContext, mode: OpMode) -> Result<Tensor> {
        let _phase = profile::scope(Phase::Attention);
        let ((cos, sin), mask) = ctx.for_layer(self.sliding);
        let (b, t, _) = x.dims3()?;
        let (q, k, v) = self.project(x, ctx.dropout.as_ref(), mode)?;
        let (q, k) = match mode {
            OpMode::Fast => (
                candle_nn::rotary_emb::rope(&q, cos, sin)?,
                candle_nn::rotary_emb::rope(&k, cos, sin)?,
            ),
            OpMode::Differentiable => (
                candle_nn::rotary_emb::rope_slow(&q, cos, sin)?,
                candle_nn::rotary_emb::rope_slow(&k, cos, sin)?,
            ),
            OpMode::Fused => (fused::rope(&q, cos, sin)?, fused::rope(&k, cos, sin)?),
        };
        // The fused row op takes each kv head's query heads as rows: no repeated K and V.
        let grouped = mode == OpMode::Fused && self.softcap.is_none();
        let (k, v) = if grouped {
            (k, v)
        } else {
            let rep = self.num_heads / self.num_kv_heads;
            (repeat_kv(k, rep)?, repeat_kv(v, rep)?)
        };
        // Scores for all sequences at once would be [B, nh, T, T]: go a few sequences at a time.
        let step = ctx.attn_seqs.max(1);
        let mut outs = Vec::with_capacity(b.div_ceil(step));
        for start in (0..b).step_by(step) {
            let len = step.min(b - start);
            outs.push(self.attend(
                &q.narrow(0, start, len)?,
                &k.narrow(0, start, len)?,
                &v.narrow(0, start, len)?,
                mask,
                mode,
            )?);
        }
        let out = if outs.len() == 1 {
            outs.pop().expect("one chunk")
        } else {
            Tensor::cat(&outs, 0)?
        };
        // [B, nh, T, hd] → [B, T, nh*hd]
        let out = out
            .transpose(1, 2)?
            .reshape((b, t, self.num_heads * self.head_dim))?;
        self.o.forward(&out, ctx.dropout.as_ref())
    }

    /// The new positions x [B, t, H] against the cached keys and values (extended here): RoPE
    /// at each row's own positions (cos, sin [B, 1, t, hd/2]), mask [B, 1, t, T] → [B, t, H].
    fn forward_cached(
        &self,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        mask: &Tensor,
        kv: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (q, k, v) = self.project(x, None, OpMode::Fast)?;
        let (q, k) = (rope_at(&q, cos, sin)?, rope_at(&k, cos, sin)?);
        let (k, v) = match kv.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        *kv = Some((k.clone(), v.clone()));
        let rep = self.num_heads / self.num_kv_heads;
        let out = self.attend(
            &q,
            &repeat_kv(k, rep)?,
            &repeat_kv(v, rep)?,
            mask,
            OpMode::Fast,
        )?;
        let out = out
            .transpose(1, 2)?
            .reshape((b, t, self.num_heads * self.head_dim))?;
        self.o.forward(&out, None)
    }

    /// q, k, v: [b, nh, T, hd]; mask [T, T] (or [b, 1, Tq, Tk]) → [b, nh, T, hd]. Softmax in
    /// f32, as HF's eager attention does.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        mode: OpMode,
    ) -> Result<Tensor> {
        if mode == OpMode::Fused && self.softcap.is_none() {
            return self.attend_grouped(q, k, v);
        }
        // scores [b, nh, T, T]
        let mut scores = (q.matmul(&k.t()?)? * self.scale)?;
        if let Some(cap) = self.softcap {
            scores = ((scores / cap)?.tanh()? * cap)?;
        }
        let scores = scores.to_dtype(DType::F32)?.broadcast_add(mask)?;
        let probs = match mode {
            OpMode::Fast => candle_nn::ops::softmax_last_dim(&scores)?,
            _ => candle_nn::ops::softmax(&scores, D::Minus1)?,
        }
        .to_dtype(v.dtype())?;
        Ok(probs.matmul(v)?)
    }

    /// q [b, nh, Tq, hd], k and v [b, kv, Tk, hd] (not repeated) → [b, nh, Tq, hd], with the
    /// fused row op: each kv head's query heads are stacked as rows [b, kv, groups·Tq, Tk].
    fn attend_grouped(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (b, nh, tq, hd) = q.dims4()?;
        let (kv, tk) = (k.dim(1)?, k.dim(2)?);
        let q = q.contiguous()?.reshape((b, kv, nh / kv * tq, hd))?;
        let scores = q.matmul(&k.t()?)?;
        let probs = fused::attention_probs(
            &scores,
            AttnSoftmax {
                scale: self.scale as f32,
                group_rows: tq,
                q_offset: tk - tq,
                window: self.window,
            },
        )?;
        Ok(probs.matmul(v)?.reshape((b, nh, tq, hd))?)
    }
}

/// RoPE (HF's rotate-half form) at per-row positions: x [B, n, t, hd], cos and sin [B, 1, t, hd/2].
fn rope_at(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(3)? / 2;
    let (x1, x2) = (x.narrow(3, 0, half)?, x.narrow(3, half, half)?);
    let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let b = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Ok(Tensor::cat(&[a, b], 3)?)
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
    gate: Proj,
    up: Proj,
    down: Proj,
    activation: Activation,
}

impl Mlp {
    fn forward(&self, x: &Tensor, dropout: Option<&Dropout>, mode: OpMode) -> Result<Tensor> {
        let _phase = profile::scope(Phase::Mlp);
        let gate = self.gate.forward(x, dropout)?;
        if mode == OpMode::Fused && self.activation == Activation::Silu {
            let h = fused::swiglu(&gate, &self.up.forward(x, dropout)?)?;
            return self.down.forward(&h, dropout);
        }
        let gate = match self.activation {
            Activation::Silu => gate.silu()?,
            Activation::GeluTanh => gate.gelu()?,
        };
        let h = (gate * self.up.forward(x, dropout)?)?;
        self.down.forward(&h, dropout)
    }
}

/// Where a layer's two norms sit.
#[derive(Debug, Clone)]
enum Norms {
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
    norms: Norms,
    attn: Attention,
    mlp: Mlp,
}

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

    /// x: [B, T, H] → [B, T, H]
    pub fn forward(&self, x: &Tensor, ctx: &SeqContext, mode: OpMode) -> Result<Tensor> {
        let attend = |h: &Tensor| self.attn.forward(h, ctx, mode);
        self.forward_with(x, mode, ctx.dropout.as_ref(), &attend)
    }

    /// The new positions x [B, t, H] of an incremental forward (see
    /// [`Transformer::forward_cached`]).
    fn forward_cached(
        &self,
        x: &Tensor,
        rope: (&Tensor, &Tensor),
        mask: &Tensor,
        kv: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let kv = std::cell::RefCell::new(kv);
        let attend = |h: &Tensor| {
            self.attn
                .forward_cached(h, rope, mask, &mut kv.borrow_mut())
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
    sliding_mask: Option<Tensor>,
    /// Gemma 3's sliding layers' own RoPE tables (cos, sin).
    local_rope: Option<(Tensor, Tensor)>,
    /// Sequences per chunk of attention scores ([`attention_chunk`]).
    pub attn_seqs: usize,
    /// LoRA dropout of a training forward (none when scoring).
    pub dropout: Option<Dropout>,
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
        })
    }

    /// The RoPE tables and the mask of a layer that slides or not.
    fn for_layer(&self, sliding: bool) -> ((&Tensor, &Tensor), &Tensor) {
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

/// The keys and values of every layer so far ([B, kv_heads, T, hd] each), for incremental decoding.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
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

/// [T, T] additive mask: keys j <= i within `window` positions (i - window < j).
fn additive_mask(seq_len: usize, window: usize, device: &Device) -> Result<Tensor> {
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
    /// Gemma 3: the sliding layers' RoPE (its own base).
    local_rope: Option<Rope>,
    dtype: DType,
    contexts: ContextCache,
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
            rope: Rope::new(cfg),
            local_rope: cfg.local_rope_theta.map(|theta| {
                Rope::new(&TransformerConfig {
                    rope_theta: theta,
                    ..cfg.clone()
                })
            }),
            dtype,
            contexts: ContextCache::default(),
        })
    }

    /// The tables of `seq_len` positions (cached: see [`ContextCache`]).
    pub fn context(&self, seq_len: usize, device: &Device) -> Result<SeqContext> {
        self.contexts.get(self, seq_len, device)
    }

    fn build_context(&self, seq_len: usize, device: &Device) -> Result<SeqContext> {
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
        })
    }

    /// input_ids [B, T] (u32) → embeddings [B, T, H]
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let _phase = profile::scope(Phase::Embedding);
        let x = self.embed.forward(input_ids)?;
        if !self.cfg.gemma {
            return Ok(x);
        }
        // Gemma: × √hidden, the factor rounded to the weights' dtype as transformers does
        let scale =
            Tensor::new((self.cfg.hidden_size as f32).sqrt(), x.device())?.to_dtype(x.dtype())?;
        Ok(x.broadcast_mul(&scale)?)
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

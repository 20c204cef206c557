//! `config.json` (Hugging Face layout) → [`TransformerConfig`] for the Llama, Mistral, Qwen2,
//! Qwen3 and OLMo 2 families.

use crate::error::{fs, Error, Result};
use serde::Deserialize;
use std::path::Path;

/// Which decoder family; they differ in biases, norms and defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama, Llama-3, SmolLM2, TinyLlama, and Mistral (with its sliding window).
    Llama,
    /// Qwen2 / Qwen2.5: q/k/v biases.
    Qwen2,
    /// Qwen3: RMSNorm of each query and key head before RoPE.
    Qwen3,
    /// OLMo 2: norms after each sublayer (no input norm), RMSNorm of the whole query and key
    /// projections before RoPE.
    Olmo2,
    /// Phi-3: fused `qkv_proj` and `gate_up_proj` weights; Mistral's sliding window.
    Phi3,
    /// Gemma 2: (1 + w) RMSNorm, scaled embeddings, GELU-tanh, norms before and after each
    /// sublayer, soft-capped attention and logits, alternating sliding-window layers.
    Gemma2,
    /// Gemma 3 (text): Gemma 2 without soft-capping, with per-head q/k norms and a separate
    /// RoPE base for the sliding-window layers.
    Gemma3,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// `gelu_pytorch_tanh`: GELU's tanh approximation.
    GeluTanh,
}

/// The `model_type`s (or, without one, the `architectures`) refdpo implements.
const SUPPORTED: [(&str, &str, Arch); 8] = [
    ("llama", "LlamaForCausalLM", Arch::Llama),
    ("mistral", "MistralForCausalLM", Arch::Llama),
    ("qwen2", "Qwen2ForCausalLM", Arch::Qwen2),
    ("qwen3", "Qwen3ForCausalLM", Arch::Qwen3),
    ("olmo2", "Olmo2ForCausalLM", Arch::Olmo2),
    ("phi3", "Phi3ForCausalLM", Arch::Phi3),
    ("gemma2", "Gemma2ForCausalLM", Arch::Gemma2),
    ("gemma3_text", "Gemma3ForCausalLM", Arch::Gemma3),
];

/// RMSNorm of queries and keys before RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// Over each head's `head_dim` (Qwen3: `q_norm.weight` [head_dim]).
    PerHead,
    /// Over the whole projection (OLMo 2: `q_norm.weight` [heads × head_dim]).
    Whole,
}

/// Fields whose presence means parts refdpo does not implement (experts, a vision tower).
const UNSUPPORTED_FIELDS: [(&str, &str); 6] = [
    ("num_experts", "mixture-of-experts layers"),
    ("num_local_experts", "mixture-of-experts layers"),
    ("num_experts_per_tok", "mixture-of-experts layers"),
    ("moe_intermediate_size", "mixture-of-experts layers"),
    ("vision_config", "a vision tower"),
    ("text_config", "a multimodal wrapper"),
];

/// Llama-3 style RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TransformerConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: Option<Llama3Scaling>,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias.
    pub qkv_bias: bool,
    /// o_proj carries a bias (Llama `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// transformers builds the embedding with `padding_idx = pad_token_id`: that row gets no
    /// gradient from the embedding lookup. The policy backward does the same.
    pub pad_token_id: Option<u32>,
    /// Mistral's `sliding_window`: a query attends to itself and the `w - 1` positions before.
    pub sliding_window: Option<usize>,
    pub qk_norm: QkNorm,
    /// Norms on each sublayer's output (OLMo 2) instead of its input.
    pub post_norms: bool,
    /// q/k/v in one `qkv_proj` and gate/up in one `gate_up_proj` (Phi-3).
    pub fused_projections: bool,
    /// Per layer: whether it attends within `sliding_window` (every layer for Mistral and
    /// Phi-3; Gemma's `layer_types`).
    pub sliding_layers: Vec<bool>,
    /// Gemma 3: the RoPE base of the sliding-window layers.
    pub local_rope_theta: Option<f32>,
    pub activation: Activation,
    /// Gemma: RMSNorm scales by (1 + w); embeddings are multiplied by √hidden; each sublayer is
    /// normed before and after.
    pub gemma: bool,
    /// The attention scores' scale: 1/√head_dim, or Gemma's `query_pre_attn_scalar`^-½.
    pub attn_scale: f64,
    /// Gemma 2: scores → cap · tanh(scores / cap) before the mask.
    pub attn_softcap: Option<f64>,
    /// Gemma 2: logits → cap · tanh(logits / cap) before the log-softmax.
    pub final_softcap: Option<f64>,
}

#[derive(Deserialize)]
struct Raw {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    layer_types: Option<Vec<String>>,
    rope_local_base_freq: Option<f64>,
    use_sliding_window: Option<bool>,
    sliding_window: Option<usize>,
    pad_token_id: Option<serde_json::Value>,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

impl TransformerConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path)?;
        Self::from_json(&text).map_err(|e| Error::Model(format!("`{}`: {e}", path.display())))
    }

    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let mut de = serde_json::Deserializer::from_str(text);
        let raw: Raw = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            if key == "." || inner.is_syntax() || inner.is_eof() {
                format!("not valid JSON: {inner}")
            } else {
                format!("`{key}`: {inner}")
            }
        })?;
        check_ranges(&raw)?;
        let arch = match (&raw.model_type, &raw.architectures) {
            (Some(t), _) => SUPPORTED.iter().find(|(name, _, _)| name == t),
            (None, Some(a)) => SUPPORTED
                .iter()
                .find(|(_, class, _)| a.first().is_some_and(|c| c == class)),
            (None, None) => None,
        }
        .map(|(_, _, arch)| *arch)
        .ok_or_else(|| {
            let names: Vec<&str> = SUPPORTED.iter().map(|(n, _, _)| *n).collect();
            format!(
                "model_type {:?} is not supported: refdpo runs {}",
                raw.model_type
                    .clone()
                    .or_else(|| raw.architectures.as_ref()?.first().cloned())
                    .unwrap_or_default(),
                names.join(", ")
            )
        })?;
        for (field, what) in UNSUPPORTED_FIELDS {
            if raw.rest.get(field).is_some_and(|v| !v.is_null()) {
                return Err(format!(
                    "`{field}` is set: the model has {what}, which refdpo does not implement"
                ));
            }
        }
        if raw.rest.get("use_bidirectional_attention") == Some(&serde_json::Value::Bool(true)) {
            return Err(
                "`use_bidirectional_attention` is true: the model attends both ways (an \
                        encoder), which refdpo does not implement"
                    .into(),
            );
        }
        let gemma = matches!(arch, Arch::Gemma2 | Arch::Gemma3);
        // Gemma names it `hidden_activation` (and keeps a `hidden_act` it does not use).
        let act = if gemma {
            raw.hidden_activation.as_ref().or(raw.hidden_act.as_ref())
        } else {
            raw.hidden_act.as_ref()
        };
        let activation = match act.map(String::as_str) {
            None | Some("silu") => Activation::Silu,
            Some("gelu_pytorch_tanh") => Activation::GeluTanh,
            Some(other) => {
                return Err(format!(
                    "`hidden_act` = {other:?} is not supported: refdpo implements silu and \
                     gelu_pytorch_tanh"
                ))
            }
        };
        if raw.use_sliding_window == Some(true) {
            return Err(
                "`use_sliding_window` = true is not supported: refdpo attends over the whole \
                 sequence"
                    .into(),
            );
        }
        // Qwen keeps `sliding_window` set while `use_sliding_window` is false: it is unused there.
        let sliding_window = match arch {
            Arch::Qwen2 | Arch::Qwen3 | Arch::Olmo2 => None,
            _ => raw.sliding_window,
        };
        let layers = raw.num_hidden_layers;
        let sliding_layers: Vec<bool> = match (&raw.layer_types, sliding_window) {
            (_, None) => vec![false; layers],
            (Some(types), Some(_)) if gemma => {
                if types.len() != layers {
                    return Err(format!(
                        "`layer_types` has {} entries for {layers} layers",
                        types.len()
                    ));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "sliding_attention" => Ok(true),
                        "full_attention" => Ok(false),
                        other => Err(format!("`layer_types` entry {other:?} is not supported")),
                    })
                    .collect::<std::result::Result<_, _>>()?
            }
            // transformers' defaults without `layer_types`: Gemma 2 alternates (sliding first),
            // Gemma 3 has one full layer in every `sliding_window_pattern` (6 by default; its
            // 4.x configs still write the int), the last of each group.
            (None, Some(_)) if gemma => {
                let every = match arch {
                    Arch::Gemma3 => ["sliding_window_pattern", "_sliding_window_pattern"]
                        .iter()
                        .find_map(|k| raw.rest.get(*k)?.as_u64())
                        .unwrap_or(6),
                    _ => 2,
                };
                if every == 0 {
                    return Err("`sliding_window_pattern` = 0: it must be at least 1".into());
                }
                (0..layers)
                    .map(|i| !(i as u64 + 1).is_multiple_of(every))
                    .collect()
            }
            (_, Some(_)) => vec![true; layers],
        };
        // transformers 5 nests RoPE settings under `rope_parameters` (per layer type for Gemma
        // 3); 4.x used top-level keys.
        let params = raw.rope_parameters.as_ref();
        let per_type = |t: &str| params.and_then(|p| p.get(t)).filter(|v| v.is_object());
        let global = per_type("full_attention").or(params);
        let rope = global.or(raw.rope_scaling.as_ref());
        // transformers' defaults where a config gives none: Gemma 3's global base is 1e6 and its
        // local one 1e4, every other family's 1e4
        let theta = raw
            .rope_theta
            .or_else(|| global?.get("rope_theta")?.as_f64())
            .unwrap_or(if arch == Arch::Gemma3 { 1e6 } else { 10_000.0 });
        // Phi-3.5/Phi-4-mini rotate only part of each head (transformers 5 writes the factor
        // into `rope_parameters`, 4.x at the top level).
        let partial = raw
            .rest
            .get("partial_rotary_factor")
            .or_else(|| global?.get("partial_rotary_factor"))
            .and_then(|v| v.as_f64());
        if let Some(f) = partial.filter(|&f| f != 1.0) {
            return Err(format!(
                "`partial_rotary_factor` = {f}: the model rotates part of each head, which refdpo \
                 does not implement"
            ));
        }
        let local_theta = match arch {
            Arch::Gemma3 => raw
                .rope_local_base_freq
                .or_else(|| per_type("sliding_attention")?.get("rope_theta")?.as_f64())
                .or(Some(10_000.0)),
            _ => None,
        };
        // wherever they were read from (`rope_parameters` too): a base RoPE's f32 tables hold
        for (key, t) in [
            ("rope_theta", Some(theta)),
            ("local rope_theta", local_theta),
        ] {
            if let Some(t) = t.filter(|&t| !(t > 0.0 && (t as f32).is_finite())) {
                return Err(format!(
                    "`{key}` = {t}: it must be a number above 0 that f32 holds (up to 3.4e38)"
                ));
            }
        }
        let local_rope_theta = local_theta.map(|t| t as f32);
        let rope_scaling = match rope {
            Some(v) if v.is_object() => parse_scaling(v)?,
            _ => None,
        };
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if !raw.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(format!(
                "`num_attention_heads` {} is not a multiple of `num_key_value_heads` \
                 {num_kv_heads}",
                raw.num_attention_heads
            ));
        }
        let head_dim = raw
            .head_dim
            .unwrap_or(raw.hidden_size / raw.num_attention_heads);
        let attn_scale = match (gemma, raw.query_pre_attn_scalar) {
            (true, Some(s)) => s.powf(-0.5),
            _ => (head_dim as f64).powf(-0.5),
        };
        Ok(Self {
            arch,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: theta as f32,
            rope_scaling,
            // Gemma's configs leave out the tie they rely on (transformers' default).
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(gemma),
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: arch != Arch::Qwen2 && attention_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            // an id no token has (negative, or past u32) pads nothing, as in transformers
            pad_token_id: raw
                .pad_token_id
                .as_ref()
                .and_then(|v| v.as_u64())
                .and_then(|v| u32::try_from(v).ok()),
            sliding_window,
            qk_norm: match arch {
                Arch::Qwen3 | Arch::Gemma3 => QkNorm::PerHead,
                Arch::Olmo2 => QkNorm::Whole,
                Arch::Llama | Arch::Qwen2 | Arch::Phi3 | Arch::Gemma2 => QkNorm::None,
            },
            post_norms: arch == Arch::Olmo2,
            fused_projections: arch == Arch::Phi3,
            sliding_layers,
            local_rope_theta,
            activation,
            gemma,
            attn_scale,
            attn_softcap: raw.attn_logit_softcapping.filter(|_| arch == Arch::Gemma2),
            final_softcap: raw.final_logit_softcapping.filter(|_| gemma),
        })
    }
}

/// The largest size a config may give (2^31 − 1): tensors' element counts are 32-bit on the GPU.
const MAX_SIZE: usize = i32::MAX as usize;

/// The most layers a config may declare.
const MAX_LAYERS: usize = 1 << 16;

/// The sizes every later shape and division relies on, in range: each bad one named with its
/// value (a zero head count would divide by zero, a zero layer count build an empty model).
fn check_ranges(raw: &Raw) -> std::result::Result<(), String> {
    let at_least_one = [
        ("vocab_size", Some(raw.vocab_size)),
        ("hidden_size", Some(raw.hidden_size)),
        ("intermediate_size", Some(raw.intermediate_size)),
        ("num_hidden_layers", Some(raw.num_hidden_layers)),
        ("num_attention_heads", Some(raw.num_attention_heads)),
        ("num_key_value_heads", raw.num_key_value_heads),
        ("head_dim", raw.head_dim),
        // Qwen's and OLMo 2's configs keep a `sliding_window` they do not use (0 in some)
        (
            "sliding_window",
            raw.sliding_window
                .filter(|_| raw.use_sliding_window != Some(false)),
        ),
    ];
    for (key, value) in at_least_one {
        if value == Some(0) {
            return Err(format!("`{key}` = 0: it must be at least 1"));
        }
        // A size past 32 bits is no model's: the GPU kernels count in 32 bits, and the products
        // of two such sizes must not wrap. Refused before anything is allocated for it.
        if let Some(v) = value.filter(|&v| v > MAX_SIZE) {
            return Err(format!(
                "`{key}` = {v} is beyond any model's (at most {MAX_SIZE}): config.json is damaged"
            ));
        }
    }
    // Each layer is listed, checked and built: a damaged count must not allocate for all of them.
    if raw.num_hidden_layers > MAX_LAYERS {
        return Err(format!(
            "`num_hidden_layers` = {} is beyond any model's (at most {MAX_LAYERS}; released models \
             have a few hundred): config.json is damaged",
            raw.num_hidden_layers
        ));
    }
    let head_dim = raw
        .head_dim
        .unwrap_or(raw.hidden_size / raw.num_attention_heads);
    if head_dim == 0 {
        return Err(format!(
            "`hidden_size` = {} is smaller than `num_attention_heads` = {}: no `head_dim` is left \
             (set `head_dim` or fix the sizes)",
            raw.hidden_size, raw.num_attention_heads
        ));
    }
    if head_dim % 2 == 1 {
        return Err(format!(
            "head_dim = {head_dim} is odd: RoPE rotates the two halves of each head (set an even \
             `head_dim`)"
        ));
    }
    let positive = [
        ("rms_norm_eps", raw.rms_norm_eps),
        ("rope_theta", raw.rope_theta),
        ("query_pre_attn_scalar", raw.query_pre_attn_scalar),
        ("attn_logit_softcapping", raw.attn_logit_softcapping),
        ("final_logit_softcapping", raw.final_logit_softcapping),
        ("rope_local_base_freq", raw.rope_local_base_freq),
    ];
    for (key, value) in positive {
        if let Some(v) = value.filter(|v| !(v.is_finite() && *v > 0.0)) {
            return Err(format!("`{key}` = {v}: it must be a finite number above 0"));
        }
    }
    Ok(())
}

fn parse_scaling(v: &serde_json::Value) -> std::result::Result<Option<Llama3Scaling>, String> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num = |k: &str| {
        let x = v
            .get(k)
            .and_then(|x| x.as_f64())
            .ok_or_else(|| format!("rope scaling `llama3` lacks `{k}`"))?;
        if !(x.is_finite() && x > 0.0) {
            return Err(format!(
                "rope scaling `{k}` = {x}: it must be a finite number above 0"
            ));
        }
        Ok(x as f32)
    };
    match kind {
        "default" => Ok(None),
        "llama3" => Ok(Some(Llama3Scaling {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        })),
        other => Err(format!(
            "`rope_scaling.rope_type` = {other:?} is not supported: refdpo implements default and \
             llama3"
        )),
    }
}

#[cfg(test)]
mod tests;

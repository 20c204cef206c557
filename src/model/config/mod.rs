//! `config.json` (Hugging Face layout) → [`TransformerConfig`] for the eight families of
//! [`family::FAMILIES`], read as transformers 5.24 reads it: the keys each family's modeling code
//! uses, its config class's defaults where a key is absent, RoPE settings by transformers' rules
//! ([`rope`]); a key whose value refdpo would only approximate is refused by name.

mod family;
mod rope;

use crate::error::{fs, Error, Result};
pub use rope::{Llama3Scaling, RopeConfig, RopeScaling};
use serde::{Deserialize, Deserializer};
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
    /// RoPE's base and scaling (Gemma 3: its full-attention layers').
    pub rope: RopeConfig,
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
    /// Gemma 3: the sliding-window layers' own RoPE settings.
    pub local_rope: Option<RopeConfig>,
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
    /// `max_position_embeddings`, where set: `generate` warns past it, as transformers does.
    pub max_positions: Option<usize>,
}

/// A key's three states in config.json: absent (the family's default applies), null, or set.
#[derive(Debug, Clone, Copy, Default)]
enum Field<T> {
    #[default]
    Absent,
    Null,
    Set(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(Option::<T>::deserialize(d)?.map_or(Field::Null, Field::Set))
    }
}

impl<T> Field<T> {
    /// The value, else `default` where the key is absent; None where it is null.
    fn or(self, default: Option<T>) -> Option<T> {
        match self {
            Field::Absent => default,
            Field::Null => None,
            Field::Set(v) => Some(v),
        }
    }

    fn set(&self) -> Option<&T> {
        match self {
            Field::Set(v) => Some(v),
            _ => None,
        }
    }

    /// The value, else `default` where absent; null is an error naming `key`.
    fn number(self, key: &str, default: T) -> std::result::Result<T, String> {
        match self {
            Field::Absent => Ok(default),
            Field::Null => Err(format!("`{key}` is null: it must be a number")),
            Field::Set(v) => Ok(v),
        }
    }
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
    #[serde(default)]
    rms_norm_eps: Field<f64>,
    #[serde(default)]
    rope_theta: Field<f64>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    #[serde(default)]
    query_pre_attn_scalar: Field<f64>,
    #[serde(default)]
    attn_logit_softcapping: Field<f64>,
    #[serde(default)]
    final_logit_softcapping: Field<f64>,
    layer_types: Option<Vec<String>>,
    rope_local_base_freq: Option<f64>,
    use_sliding_window: Option<bool>,
    #[serde(default)]
    sliding_window: Field<usize>,
    #[serde(default)]
    pad_token_id: Field<serde_json::Value>,
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
            if inner.is_syntax() || inner.is_eof() {
                format!("not valid JSON: {inner}")
            } else if key == "." {
                // a size key left out, which transformers' config class would default: refdpo
                // does not guess a model's shape
                format!(
                    "{inner}: write it into the file (refdpo takes no default for a model's sizes)"
                )
            } else {
                format!("`{key}`: {inner}")
            }
        })?;
        check_ranges(&raw)?;
        // the same text as a plain value: which keys are null (the typed fields read null as
        // absent)
        let json: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let null = |key: &str| json.get(key).is_some_and(serde_json::Value::is_null);
        check_types(&raw, null("model_type"))?;
        let family = family::find(raw.model_type.as_deref(), raw.architectures.as_deref())
            .ok_or_else(|| {
                let names: Vec<&str> = family::FAMILIES.iter().map(|f| f.model_type).collect();
                format!(
                    "model_type {:?} is not supported: refdpo runs {}",
                    raw.model_type
                        .clone()
                        .or_else(|| raw.architectures.as_ref()?.first().cloned())
                        .unwrap_or_default(),
                    names.join(", ")
                )
            })?;
        let arch = family.arch;
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
        // Gemma reads `hidden_activation` (a `hidden_act` beside it is not used), the rest
        // `hidden_act`.
        let act = match family.activation_key {
            "hidden_activation" => raw.hidden_activation.as_deref(),
            _ => raw.hidden_act.as_deref(),
        };
        // null where the family reads it: transformers' validator refuses it (the other key
        // is not read, null or not)
        if null(family.activation_key) {
            return Err(format!(
                "`{}` is null: it must be a string",
                family.activation_key
            ));
        }
        let activation = match act.unwrap_or(family.activation) {
            "silu" => Activation::Silu,
            "gelu_pytorch_tanh" => Activation::GeluTanh,
            other => {
                return Err(format!(
                    "`{}` = {other:?} is not supported: refdpo implements silu and \
                     gelu_pytorch_tanh",
                    family.activation_key
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
            _ => raw.sliding_window.or(family.sliding_window),
        };
        let layers = raw.num_hidden_layers;
        // `layer_types` says which layers slide where the modeling code reads it: Gemma's and
        // Mistral's (Phi-3's ignores it: every layer slides).
        let reads_layer_types = gemma || family.model_type == "mistral";
        let sliding_layers: Vec<bool> = match (&raw.layer_types, sliding_window) {
            (_, None) => vec![false; layers],
            (Some(types), Some(_)) if reads_layer_types => {
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
                    Arch::Gemma3 => raw
                        .rest
                        .get("sliding_window_pattern")
                        .and_then(|v| v.as_u64())
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
        let keys = rope::RopeKeys {
            rope_theta: raw.rope_theta.set().copied(),
            rope_scaling: raw.rope_scaling.as_ref(),
            rope_parameters: raw.rope_parameters.as_ref(),
            rope_local_base_freq: raw.rope_local_base_freq,
            partial_rotary_factor: raw.rest.get("partial_rotary_factor"),
            original_max_position_embeddings: raw.rest.get("original_max_position_embeddings"),
        };
        let (rope, local_rope) = rope::resolve(&keys, arch == Arch::Gemma3, family.rope_theta)?;
        let attention_bias = family.reads_attention_bias && raw.attention_bias.unwrap_or(false);
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
        let attn_scale = match family.query_pre_attn_scalar {
            Some(default) => raw
                .query_pre_attn_scalar
                .number("query_pre_attn_scalar", default)?
                .powf(-0.5),
            None => (head_dim as f64).powf(-0.5),
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
            rms_norm_eps: raw
                .rms_norm_eps
                .number("rms_norm_eps", family.rms_norm_eps)?,
            rope,
            tie_word_embeddings: raw
                .tie_word_embeddings
                .unwrap_or(family.tie_word_embeddings),
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: attention_bias,
            mlp_bias: family.reads_mlp_bias && raw.mlp_bias.unwrap_or(false),
            // an id no token has (negative, or past u32) pads nothing, as in transformers
            pad_token_id: match raw.pad_token_id {
                Field::Absent => family.pad_token_id,
                Field::Null => None,
                Field::Set(v) => v.as_u64().and_then(|v| u32::try_from(v).ok()),
            },
            sliding_window,
            qk_norm: match arch {
                Arch::Qwen3 | Arch::Gemma3 => QkNorm::PerHead,
                Arch::Olmo2 => QkNorm::Whole,
                Arch::Llama | Arch::Qwen2 | Arch::Phi3 | Arch::Gemma2 => QkNorm::None,
            },
            post_norms: arch == Arch::Olmo2,
            fused_projections: arch == Arch::Phi3,
            sliding_layers,
            local_rope,
            activation,
            gemma,
            attn_scale,
            attn_softcap: match arch {
                Arch::Gemma2 => raw.attn_logit_softcapping.or(family.attn_logit_softcapping),
                _ => None,
            },
            final_softcap: match gemma {
                true => raw
                    .final_logit_softcapping
                    .or(family.final_logit_softcapping),
                false => None,
            },
            max_positions: raw
                .rest
                .get("max_position_embeddings")
                .and_then(serde_json::Value::as_u64)
                .map(|n| n as usize),
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
                .set()
                .copied()
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
        ("rms_norm_eps", raw.rms_norm_eps.set().copied()),
        ("rope_theta", raw.rope_theta.set().copied()),
        (
            "query_pre_attn_scalar",
            raw.query_pre_attn_scalar.set().copied(),
        ),
        (
            "attn_logit_softcapping",
            raw.attn_logit_softcapping.set().copied(),
        ),
        (
            "final_logit_softcapping",
            raw.final_logit_softcapping.set().copied(),
        ),
        ("rope_local_base_freq", raw.rope_local_base_freq),
    ];
    if let Field::Null = raw.rope_theta {
        return Err("`rope_theta` is null: it must be a number".into());
    }
    for (key, value) in positive {
        if let Some(v) = value.filter(|v| !positive_f32(*v)) {
            return Err(format!(
                "`{key}` = {}: it must be a finite number above 0 within f32's range (1.2e-38 \
                 to 3.4e38; the model computes in f32)",
                short(v)
            ));
        }
    }
    Ok(())
}

/// Values transformers' config classes refuse (their strict validators) and refdpo would
/// otherwise read around: a null name or activation, a RoPE setting that is not an object, a
/// position count or pad id that is not an integer; and a quantization config, which would make
/// transformers compute with other weights than the file's.
fn check_types(raw: &Raw, null_model_type: bool) -> std::result::Result<(), String> {
    if null_model_type {
        return Err("`model_type` is null: it must be a string".into());
    }
    for (key, value) in [
        ("rope_scaling", raw.rope_scaling.as_ref()),
        ("rope_parameters", raw.rope_parameters.as_ref()),
    ] {
        if let Some(v) = value.filter(|v| !v.is_object()) {
            return Err(format!(
                "`{key}` = {v}: it must be an object of RoPE settings"
            ));
        }
    }
    if let Some(v) = raw.rest.get("max_position_embeddings") {
        if v.as_u64().is_none_or(|n| n < 1) {
            return Err(format!(
                "`max_position_embeddings` = {v}: it must be a whole number of at least 1"
            ));
        }
    }
    if let Field::Set(v) = &raw.pad_token_id {
        if v.as_i64().is_none() && v.as_u64().is_none() {
            return Err(format!(
                "`pad_token_id` = {v}: it must be a token id (an integer) or null"
            ));
        }
    }
    if let Some(q) = raw.rest.get("quantization_config").filter(|q| !q.is_null()) {
        let method = q
            .get("quant_method")
            .and_then(|m| m.as_str())
            .unwrap_or("quantized");
        return Err(format!(
            "`quantization_config` is set ({method}): transformers would load the weights \
             quantized, and refdpo computes with the file's f32/bf16/f16 weights as they are. \
             Give the unquantized model"
        ));
    }
    Ok(())
}

/// A number as written, or in exponent form where that would run past 16 characters (1e-300
/// as 1e-300, not three hundred digits).
fn short(v: f64) -> String {
    let s = v.to_string();
    if s.len() > 16 {
        format!("{v:e}")
    } else {
        s
    }
}

/// Above 0 and within f32's normal range (1e-300 would be 0 there, 1e39 infinite).
pub(crate) fn positive_f32(v: f64) -> bool {
    v.is_finite() && (f64::from(f32::MIN_POSITIVE)..=f64::from(f32::MAX)).contains(&v)
}

#[cfg(test)]
mod tests;

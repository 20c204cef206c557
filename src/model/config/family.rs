//! The eight `model_type`s refdpo implements, each with what its transformers 5.24 modeling code
//! reads from config.json and the defaults of its config class where a key is left out.
//! `tests/fixtures/families/config_defaults.json` holds transformers' own defaults (made by
//! `tests/fixtures/gen_config_defaults.py`); a test compares this table with it.

use super::Arch;

/// One supported `model_type`.
#[derive(Debug)]
pub(super) struct Family {
    pub model_type: &'static str,
    /// Its `architectures` class, which picks the family when `model_type` is absent.
    pub class: &'static str,
    pub arch: Arch,
    pub rms_norm_eps: f64,
    /// The activation's key (Gemma reads `hidden_activation`, the rest `hidden_act`) and default.
    pub activation_key: &'static str,
    pub activation: &'static str,
    /// The modeling code reads `attention_bias` (q, k, v and o biases); else the flag is ignored,
    /// as transformers ignores it (Qwen2's q/k/v biases are always there).
    pub reads_attention_bias: bool,
    /// The modeling code reads `mlp_bias`.
    pub reads_mlp_bias: bool,
    /// `sliding_window` when the key is absent (null means none).
    pub sliding_window: Option<usize>,
    /// The attention scores' scale is `query_pre_attn_scalar`^-½ (Gemma), this when absent.
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 2's soft caps when the keys are absent (null means none).
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    pub tie_word_embeddings: bool,
    pub pad_token_id: Option<u32>,
    /// The RoPE base where a config gives none (Gemma 3: its full-attention layers').
    pub rope_theta: f64,
}

const LLAMA: Family = Family {
    model_type: "llama",
    class: "LlamaForCausalLM",
    arch: Arch::Llama,
    rms_norm_eps: 1e-6,
    activation_key: "hidden_act",
    activation: "silu",
    reads_attention_bias: true,
    reads_mlp_bias: true,
    sliding_window: None,
    query_pre_attn_scalar: None,
    attn_logit_softcapping: None,
    final_logit_softcapping: None,
    tie_word_embeddings: false,
    pad_token_id: None,
    rope_theta: 10_000.0,
};

const GEMMA2: Family = Family {
    model_type: "gemma2",
    class: "Gemma2ForCausalLM",
    arch: Arch::Gemma2,
    activation_key: "hidden_activation",
    activation: "gelu_pytorch_tanh",
    reads_attention_bias: true,
    reads_mlp_bias: false,
    sliding_window: Some(4096),
    query_pre_attn_scalar: Some(256.0),
    attn_logit_softcapping: Some(50.0),
    final_logit_softcapping: Some(30.0),
    tie_word_embeddings: true,
    pad_token_id: Some(0),
    ..LLAMA
};

/// In the order an error lists them.
pub(super) const FAMILIES: [Family; 8] = [
    LLAMA,
    Family {
        model_type: "mistral",
        class: "MistralForCausalLM",
        reads_attention_bias: false,
        reads_mlp_bias: false,
        sliding_window: Some(4096),
        ..LLAMA
    },
    Family {
        model_type: "qwen2",
        class: "Qwen2ForCausalLM",
        arch: Arch::Qwen2,
        reads_attention_bias: false,
        reads_mlp_bias: false,
        ..LLAMA
    },
    Family {
        model_type: "qwen3",
        class: "Qwen3ForCausalLM",
        arch: Arch::Qwen3,
        reads_mlp_bias: false,
        ..LLAMA
    },
    Family {
        model_type: "olmo2",
        class: "Olmo2ForCausalLM",
        arch: Arch::Olmo2,
        rms_norm_eps: 1e-5,
        reads_mlp_bias: false,
        pad_token_id: Some(1),
        ..LLAMA
    },
    Family {
        model_type: "phi3",
        class: "Phi3ForCausalLM",
        arch: Arch::Phi3,
        rms_norm_eps: 1e-5,
        reads_attention_bias: false,
        reads_mlp_bias: false,
        pad_token_id: Some(32000),
        ..LLAMA
    },
    GEMMA2,
    Family {
        model_type: "gemma3_text",
        class: "Gemma3ForCausalLM",
        arch: Arch::Gemma3,
        attn_logit_softcapping: None,
        final_logit_softcapping: None,
        rope_theta: 1e6,
        ..GEMMA2
    },
];

/// The family of a `model_type`, or without one of the first `architectures` class.
pub(super) fn find(
    model_type: Option<&str>,
    architectures: Option<&[String]>,
) -> Option<&'static Family> {
    match (model_type, architectures) {
        (Some(t), _) => FAMILIES.iter().find(|f| f.model_type == t),
        (None, Some(a)) => FAMILIES
            .iter()
            .find(|f| a.first().is_some_and(|c| c == f.class)),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table against transformers 5.24's config classes, as the fixture's script printed them.
    #[test]
    fn defaults_are_transformers_own() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/families/config_defaults.json"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let all: serde_json::Value = serde_json::from_str(&text).unwrap();
        for f in &FAMILIES {
            let d = &all[f.model_type];
            assert!(d.is_object(), "{} is not in the fixture", f.model_type);
            let t = f.model_type;
            assert_eq!(d["rms_norm_eps"].as_f64(), Some(f.rms_norm_eps), "{t}");
            assert_eq!(d[f.activation_key].as_str(), Some(f.activation), "{t}");
            let other = if f.activation_key == "hidden_act" {
                "hidden_activation"
            } else {
                "hidden_act"
            };
            assert!(d[other].is_null(), "{t} has `{other}` too");
            assert_eq!(
                d["reads_attention_bias"].as_bool(),
                Some(f.reads_attention_bias),
                "{t}"
            );
            assert_eq!(d["reads_mlp_bias"].as_bool(), Some(f.reads_mlp_bias), "{t}");
            let window = d["sliding_window"].as_u64().map(|w| w as usize);
            assert_eq!(window, f.sliding_window, "{t}");
            assert_eq!(
                d["query_pre_attn_scalar"].as_f64(),
                f.query_pre_attn_scalar,
                "{t}"
            );
            assert_eq!(
                d["attn_logit_softcapping"].as_f64(),
                f.attn_logit_softcapping,
                "{t}"
            );
            assert_eq!(
                d["final_logit_softcapping"].as_f64(),
                f.final_logit_softcapping,
                "{t}"
            );
            assert_eq!(
                d["tie_word_embeddings"].as_bool(),
                Some(f.tie_word_embeddings),
                "{t}"
            );
            let pad = d["pad_token_id"].as_u64().map(|p| p as u32);
            assert_eq!(pad, f.pad_token_id, "{t}");
            assert_eq!(d["rope_theta"].as_f64(), Some(f.rope_theta), "{t}");
            assert_eq!(d["class"].as_str(), Some(f.class), "{t}");
        }
    }
}

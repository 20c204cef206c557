use super::*;

#[test]
fn qwen2_has_qkv_bias_and_explicit_head_dim() {
    let c = TransformerConfig::from_json(
        r#"{"model_type":"qwen2","vocab_size":512,"hidden_size":64,"intermediate_size":176,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":24,
        "rope_theta":1000000.0,"tie_word_embeddings":true}"#,
    )
    .unwrap();
    assert_eq!(c.arch, Arch::Qwen2);
    assert!(c.qkv_bias && !c.o_bias);
    assert_eq!(c.head_dim, 24);
    assert_eq!(c.rope.theta, 1e6);
}

#[test]
fn llama3_scaling_and_rope_parameters() {
    let c = TransformerConfig::from_json(
        r#"{"model_type":"llama","vocab_size":8,"hidden_size":8,"intermediate_size":8,
        "num_hidden_layers":1,"num_attention_heads":2,
        "rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,
        "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#,
    )
    .unwrap();
    assert_eq!(c.rope.theta, 5e5);
    let Some(RopeScaling::Llama3(s)) = c.rope.scaling else {
        panic!("{:?}", c.rope)
    };
    assert_eq!(s.factor, 8.0);
    assert_eq!(c.num_kv_heads, 2);
}

fn config(extra: &str) -> std::result::Result<TransformerConfig, String> {
    TransformerConfig::from_json(&format!(
        r#"{{"vocab_size":8,"hidden_size":8,"intermediate_size":8,
        "num_hidden_layers":1,"num_attention_heads":2{extra}}}"#
    ))
}

#[test]
fn fields_that_change_the_math_and_are_not_implemented_are_refused_by_name() {
    for (extra, field) in [
        (
            r#","model_type":"qwen2","use_sliding_window":true"#,
            "use_sliding_window",
        ),
        (r#","model_type":"llama","hidden_act":"gelu""#, "hidden_act"),
        (
            r#","model_type":"llama","rope_scaling":{"rope_type":"yarn","factor":4.0}"#,
            "rope_scaling.rope_type",
        ),
        (
            r#","model_type":"mistral","num_local_experts":8"#,
            "num_local_experts",
        ),
        (r#","model_type":"qwen2","num_experts":60"#, "num_experts"),
        (
            r#","model_type":"llama","vision_config":{}"#,
            "vision_config",
        ),
        (
            r#","model_type":"llama","partial_rotary_factor":0.5"#,
            "partial_rotary_factor",
        ),
        (
            r#","model_type":"phi3","rope_parameters":{"rope_theta":1e4,"partial_rotary_factor":0.75}"#,
            "rope_parameters.partial_rotary_factor",
        ),
        (
            r#","model_type":"gemma2","hidden_activation":"gelu""#,
            "hidden_activation",
        ),
        (
            r#","model_type":"phi3","rope_scaling":{"type":"su","partial_rotary_factor":0.5}"#,
            "rope_scaling.partial_rotary_factor",
        ),
        (
            r#","model_type":"llama","rope_parameters":{"rope_type":"yarn","factor":4.0}"#,
            "rope_parameters.rope_type",
        ),
        (
            r#","model_type":"gemma3_text","rope_parameters":{"sliding_attention":{"rope_type":"dynamic","factor":2}}"#,
            "rope_parameters.sliding_attention.rope_type",
        ),
        (
            r#","model_type":"llama","rope_parameters":{"full_attention":{"rope_theta":1e4}}"#,
            "rope_parameters.full_attention",
        ),
        (
            r#","model_type":"gemma2","query_pre_attn_scalar":null"#,
            "query_pre_attn_scalar",
        ),
        (
            r#","model_type":"llama","rms_norm_eps":null"#,
            "rms_norm_eps",
        ),
        (r#","model_type":"llama","rope_theta":null"#, "rope_theta"),
        // a RoPE type that is no name: transformers' KeyError (it had been no scaling; fuzzer)
        (
            r#","model_type":"llama","rope_scaling":{"type":5,"factor":2.0}"#,
            "rope_scaling.type",
        ),
        (
            r#","model_type":"llama","rope_scaling":{"rope_type":null,"factor":2.0}"#,
            "rope_scaling.rope_type",
        ),
        (
            r#","model_type":"gemma3_text","rope_parameters":{"full_attention":[1]}"#,
            "rope_parameters.full_attention",
        ),
    ] {
        let e = config(extra).unwrap_err();
        assert!(e.contains(&format!("`{field}`")), "{extra}: {e}");
    }
    // Families that only share a prefix with a supported one are not taken for it.
    for t in ["qwen2_moe", "qwen2_vl", "llama4", "mistral3", "gemma3"] {
        let e = config(&format!(r#","model_type":"{t}""#)).unwrap_err();
        assert!(
            e.contains(t) && e.contains("llama, mistral, qwen2, qwen3, olmo2"),
            "{e}"
        );
    }
    // Qwen's sliding_window is inert while use_sliding_window is false; Mistral's is used.
    let q = config(r#","model_type":"qwen2","use_sliding_window":false,"sliding_window":32"#);
    assert_eq!(q.unwrap().sliding_window, None);
    let q = config(r#","model_type":"qwen2","use_sliding_window":false,"sliding_window":0"#);
    assert_eq!(q.unwrap().sliding_window, None, "an unused 0 is no error");
    let m = config(r#","model_type":"mistral","sliding_window":4096"#).unwrap();
    assert_eq!(m.sliding_window, Some(4096));
    let q3 = config(r#","model_type":"qwen3","head_dim":12"#).unwrap();
    assert_eq!(
        (q3.qk_norm, q3.qkv_bias, q3.post_norms),
        (QkNorm::PerHead, false, false)
    );
    let o = config(r#","model_type":"olmo2""#).unwrap();
    assert_eq!((o.qk_norm, o.post_norms), (QkNorm::Whole, true));
}

#[test]
fn sizes_out_of_range_are_refused_by_key() {
    for (key, value, said) in [
        ("num_attention_heads", "0", "`num_attention_heads` = 0"),
        ("num_key_value_heads", "0", "`num_key_value_heads` = 0"),
        ("num_hidden_layers", "0", "`num_hidden_layers` = 0"),
        ("num_hidden_layers", "-2", "`num_hidden_layers`"),
        ("vocab_size", "\"many\"", "`vocab_size`"),
        ("num_attention_heads", "16", "`hidden_size` = 8"),
        ("num_key_value_heads", "3", "`num_key_value_heads` 3"),
        ("head_dim", "3", "head_dim = 3"),
        ("rms_norm_eps", "-1.0", "`rms_norm_eps` = -1"),
        ("rope_theta", "0.0", "`rope_theta` = 0"),
        ("rope_theta", "1e39", "`rope_theta` = 1e39"),
        (
            "rope_parameters",
            r#"{"rope_theta": 0}"#,
            "`rope_theta` = 0",
        ),
        (
            "rope_parameters",
            r#"{"rope_theta": -5}"#,
            "`rope_theta` = -5",
        ),
        // below f32's smallest normal: 0 as f32 (fuzzer)
        (
            "rope_parameters",
            r#"{"rope_theta": 1e-300}"#,
            "`rope_theta` = 1e-300",
        ),
        (
            "num_hidden_layers",
            "1000000000",
            "`num_hidden_layers` = 1000000000 is beyond",
        ),
        (
            "vocab_size",
            "10000000000000",
            "`vocab_size` = 10000000000000 is beyond",
        ),
        (
            "head_dim",
            "4294967296",
            "`head_dim` = 4294967296 is beyond",
        ),
    ] {
        let mut v: serde_json::Value = serde_json::from_str(
            r#"{"model_type":"llama","vocab_size":8,"hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":2}"#,
        )
        .unwrap();
        v[key] = serde_json::from_str(value).unwrap();
        let e = TransformerConfig::from_json(&v.to_string()).unwrap_err();
        assert!(e.contains(said), "{key} = {value}: {e}");
    }
    let e = TransformerConfig::from_json("{\"vocab_size\": 8,").unwrap_err();
    assert!(e.starts_with("not valid JSON"), "{e}");
    let e = TransformerConfig::from_json(r#"{"model_type":"llama","hidden_size":8}"#).unwrap_err();
    assert!(
        e.contains("missing field") && e.contains("write it into the file") && !e.contains("JSON"),
        "{e}"
    );
}

#[test]
fn unsupported_family_is_named() {
    let e = TransformerConfig::from_json(
        r#"{"model_type":"gpt2","vocab_size":8,"hidden_size":8,"intermediate_size":8,
        "num_hidden_layers":1,"num_attention_heads":2}"#,
    )
    .unwrap_err();
    assert!(e.contains("gpt2"), "{e}");
}

/// Without `layer_types`, transformers 5.24's configs give (printed by `Gemma3TextConfig(
/// num_hidden_layers=6, sliding_window=4[, sliding_window_pattern=3]).layer_types` and
/// `Gemma2Config(num_hidden_layers=4)`): Gemma 3 one full layer in six (or in the given
/// pattern), its RoPE bases 1e6 (full) and 1e4 (sliding); Gemma 2 alternating.
#[test]
fn layer_patterns_and_rope_bases_default_as_transformers() {
    let cfg = |extra: &str| {
        TransformerConfig::from_json(&format!(
            r#"{{"vocab_size":8,"hidden_size":8,"intermediate_size":8,"num_attention_heads":2,
            "sliding_window":4{extra}}}"#
        ))
        .unwrap()
    };
    let (t, f) = (true, false);
    let g3 = cfg(r#","model_type":"gemma3_text","num_hidden_layers":6"#);
    assert_eq!(g3.sliding_layers, [t, t, t, t, t, f]);
    let local = g3.local_rope.as_ref().map(|r| r.theta);
    assert_eq!((g3.rope.theta, local), (1e6, Some(1e4)));
    let g3 = cfg(r#","model_type":"gemma3_text","num_hidden_layers":6,"sliding_window_pattern":3"#);
    assert_eq!(g3.sliding_layers, [t, t, f, t, t, f]);
    let g2 = cfg(r#","model_type":"gemma2","num_hidden_layers":4"#);
    assert_eq!(g2.sliding_layers, [t, f, t, f]);
    let e = TransformerConfig::from_json(
        r#"{"vocab_size":8,"hidden_size":8,"intermediate_size":8,"num_attention_heads":2,
        "num_hidden_layers":1,"model_type":"gemma3_text","use_bidirectional_attention":true}"#,
    )
    .unwrap_err();
    assert!(e.contains("use_bidirectional_attention"), "{e}");
}

/// Values transformers' strict config validators refuse are refused by key, not read around.
#[test]
fn wrong_types_transformers_refuses_are_refused_by_key() {
    for (extra, key) in [
        (
            r#","model_type":null,"architectures":["LlamaForCausalLM"]"#,
            "model_type",
        ),
        (r#","model_type":"llama","hidden_act":null"#, "hidden_act"),
        (
            r#","model_type":"gemma2","hidden_activation":null,"head_dim":4"#,
            "hidden_activation",
        ),
        (
            r#","model_type":"llama","max_position_embeddings":"x""#,
            "max_position_embeddings",
        ),
        (
            r#","model_type":"llama","max_position_embeddings":null"#,
            "max_position_embeddings",
        ),
        (
            r#","model_type":"llama","max_position_embeddings":0"#,
            "max_position_embeddings",
        ),
        (r#","model_type":"phi3","rope_scaling":"x""#, "rope_scaling"),
        (
            r#","model_type":"llama","rope_parameters":[1]"#,
            "rope_parameters",
        ),
        (
            r#","model_type":"llama","pad_token_id":"x""#,
            "pad_token_id",
        ),
        (
            r#","model_type":"llama","quantization_config":{"quant_method":"bitsandbytes","load_in_4bit":true}"#,
            "quantization_config",
        ),
    ] {
        let err = config(extra).unwrap_err();
        assert!(err.contains(key), "{extra}: {err}");
    }
    // what real configs hold passes: a null rope_scaling, a negative pad id (pads nothing)
    for extra in [
        // the activation key the family does not read may be null
        r#","model_type":"llama","hidden_activation":null"#,
        r#","model_type":"gemma2","hidden_act":null,"head_dim":4"#,
        r#","model_type":"llama","rope_scaling":null,"max_position_embeddings":2048"#,
        r#","model_type":"llama","pad_token_id":-1,"quantization_config":null"#,
    ] {
        config(extra).unwrap();
    }
}

//! Deterministic weights from a formula any language can reproduce (splitmix64 keyed by the FNV-1a
//! hash of each HF tensor name): the demo model and the test fixtures' model, with no binary committed.
//! The demo's tiny architecture lives here too, beside the code that fills it.

use super::config::TransformerConfig;
use crate::error::{fs, Error, Result};
use candle_core::{Device, Tensor};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

pub use crate::rng::{fnv1a64, uniform};

/// Values of one tensor: norms 1 + 0.1u, biases 0.1u, everything else std·√3·u.
pub fn tensor_values(name: &str, numel: usize, seed: u64, init_std: f64) -> Vec<f32> {
    let key = fnv1a64(name) ^ seed;
    let (offset, scale) = if name.ends_with("norm.weight") {
        (1.0, 0.1)
    } else if name.ends_with(".bias") {
        (0.0, 0.1)
    } else {
        (0.0, init_std * 3f64.sqrt())
    };
    (1..=numel as u64)
        .map(|i| (offset + scale * uniform(key, i)) as f32)
        .collect()
}

/// All tensors of a freshly initialized model, f32 on the CPU.
pub fn init_weights(
    cfg: &TransformerConfig,
    seed: u64,
    init_std: f64,
) -> Result<HashMap<String, Tensor>> {
    super::shapes::expected(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let numel = shape.iter().product();
            let values = tensor_values(&name, numel, seed, init_std);
            let t = Tensor::from_vec(values, shape, &Device::Cpu)?;
            Ok((name, t))
        })
        .collect()
}

/// The demo model's architecture: a tiny Llama (2 layers, hidden 64, GQA 4/2).
pub fn tiny_llama_config(vocab_size: usize) -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": false,
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32"
    })
}

/// Writes `config.json` and formula-initialized `model.safetensors` into `dir`: a model in HF
/// layout made from nothing (the demo's; tests make theirs the same way).
pub fn write_model(dir: &Path, config: &serde_json::Value, seed: u64, std: f64) -> Result<()> {
    let text = serde_json::to_string_pretty(config)?;
    fs::write_atomic(&dir.join("config.json"), text.as_bytes())?;
    let tcfg = TransformerConfig::from_json(&config.to_string()).map_err(Error::Model)?;
    super::weights::save(
        &init_weights(&tcfg, seed, std)?,
        &dir.join("model.safetensors"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_reference_values() {
        // splitmix64(seed=0) first output is 0xE220A8397B1DCDAF (Vigna's reference generator).
        let z = 0xE220_A839_7B1D_CDAFu64;
        let expected = (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
        assert_eq!(uniform(0, 1), expected);
        assert_eq!(fnv1a64(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64("a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn values_are_in_range_and_norms_near_one() {
        let v = tensor_values("model.norm.weight", 100, 1, 0.02);
        assert!(v.iter().all(|x| (0.9..1.1).contains(x)));
        let v = tensor_values("lm_head.weight", 1000, 1, 0.02);
        let bound = (0.02 * 3f64.sqrt()) as f32;
        assert!(v.iter().all(|x| x.abs() <= bound));
        assert!(v.iter().any(|x| *x != v[0]));
    }
}

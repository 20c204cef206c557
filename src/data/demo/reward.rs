//! The demo's reward model: a one-layer `LlamaForSequenceClassification` in HF layout whose
//! weights are set by hand, so its score is a formula of the text (`make judge` scores with it).
//!
//! Every token embeds as (g, 1, 0, …), g = +1 for a helpful word, −1 for a dismissive one, 0
//! otherwise. Queries and keys are zero, so attention is a plain average over the causal prefix;
//! the values carry the normalized g into dimension 2, the MLP is zero, and the score head reads
//! dimension 2 after the final norm. For a conversation of n tokens, the last of them not
//! helpful or dismissive (the ChatML `<|im_end|>`), the reward is
//!
//!   r = a / √(1 + a²),  a = 4√2 · (helpful − dismissive) / n
//!
//! (up to RMSNorm's ε): the share of helpful words over dismissive ones in the whole
//! conversation, in (−1, 1). It prefers the demo's chosen answers, and a longer answer of the
//! same words scores higher only because it outweighs the prompt's words in the average.

use crate::error::{fs, Error, Result};
use crate::model::{init, shapes, weights, TransformerConfig};
use candle_core::{Device, Tensor};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

/// The score head's weight on dimension 2 (undoes the final norm's √hidden).
const SCORE: f32 = 0.125;

/// `config.json` of the demo reward model (the demo's tiny Llama, one layer, one label).
fn config(vocab_size: usize) -> serde_json::Value {
    let mut cfg = init::tiny_llama_config(vocab_size);
    let o = cfg.as_object_mut().expect("a JSON object");
    o.insert(
        "architectures".into(),
        json!(["LlamaForSequenceClassification"]),
    );
    o.insert("num_hidden_layers".into(), json!(1));
    o.insert("num_labels".into(), json!(1));
    o.insert("id2label".into(), json!({"0": "LABEL_0"}));
    o.insert("label2id".into(), json!({"LABEL_0": 0}));
    o.insert("tie_word_embeddings".into(), json!(true));
    cfg
}

/// Writes the reward model (`config.json`, `model.safetensors`) into `dir`, for a vocabulary
/// whose word i scores `polarity[i]` (+1 helpful, −1 dismissive, 0 otherwise).
pub fn write(dir: &Path, polarity: &[f32]) -> Result<()> {
    let cfg_json = config(polarity.len());
    let cfg = TransformerConfig::from_json(&cfg_json.to_string()).map_err(Error::Model)?;
    let h = cfg.hidden_size;
    let mut tensors = HashMap::new();
    for (name, shape) in shapes::expected(&cfg) {
        let numel: usize = shape.iter().product();
        let mut v = vec![0f32; numel];
        let cols = *shape.last().expect("a shape");
        if name.ends_with("norm.weight") {
            v.fill(1.0);
        } else if name == "model.embed_tokens.weight" {
            for (i, g) in polarity.iter().enumerate() {
                v[i * cols] = *g;
                v[i * cols + 1] = 1.0;
            }
        } else if name.ends_with("self_attn.v_proj.weight") {
            v[0] = 1.0; // kv head 0, dim 0 ← hidden dim 0
        } else if name.ends_with("self_attn.o_proj.weight") {
            v[2 * cols] = 1.0; // hidden dim 2 ← query head 0 (on kv head 0), dim 0
        }
        tensors.insert(name, Tensor::from_vec(v, shape, &Device::Cpu)?);
    }
    let mut score = vec![0f32; h];
    score[2] = SCORE;
    tensors.insert(
        "score.weight".into(),
        Tensor::from_vec(score, (1, h), &Device::Cpu)?,
    );
    let text = serde_json::to_string_pretty(&cfg_json)?;
    fs::write_atomic(&dir.join("config.json"), text.as_bytes())?;
    weights::save(&tensors, &dir.join("model.safetensors"))
}

/// The reward of token ids `ids` by the module doc's formula, RMSNorm's ε (1e-5) included:
/// each token's g normalized over its (g, 1) embedding, averaged, then normalized with the 1 of
/// the last token's embedding.
pub fn formula(ids: &[u32], polarity: &[f32]) -> f64 {
    const EPS: f64 = 1e-5;
    let hidden = 64.0;
    let a = ids
        .iter()
        .map(|&i| {
            let g = polarity[i as usize] as f64;
            g / ((g * g + 1.0) / hidden + EPS).sqrt()
        })
        .sum::<f64>()
        / ids.len() as f64;
    f64::from(SCORE) * a / ((a * a + 1.0) / hidden + EPS).sqrt()
}

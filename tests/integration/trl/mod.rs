//! Numbers checked against TRL 1.16 / transformers 5 (fixtures made by
//! tests/fixtures/gen_trl_fixtures.py): token ids, reference log-probs and chat templates on real
//! UltraFeedback rows with the real SmolLM2 tokenizer ([`tokenization`]); the weight formula, every
//! loss, and one full training step ([`training`]).

mod layouts;
mod lora;
mod tokenization;
mod training;

use super::common::{read_json, repo};
use refdpo::data::PreferenceRow;
use refdpo::model::{init, weights, TransformerConfig};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

pub fn fixture(name: &str) -> Value {
    read_json(&repo().join("tests/fixtures").join(name))
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn close(got: f64, want: f64, rel: f64) -> bool {
    (got - want).abs() <= rel * want.abs().max(1.0)
}

pub fn model_config(fx: &Value) -> Value {
    let mut cfg = fx["model"]["config"].clone();
    cfg["model_type"] = json!("llama");
    cfg["architectures"] = json!(["LlamaForCausalLM"]);
    cfg
}

/// The fixture model in HF layout with the real SmolLM2 tokenizer, in a temporary directory.
pub fn model_dir(tmp: &Path, realdata: &Path, fx: &Value) -> PathBuf {
    let dir = tmp.join("model");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = model_config(fx);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let tcfg = TransformerConfig::from_json(&cfg.to_string()).unwrap();
    let (seed, std) = (
        fx["model"]["seed"].as_u64().unwrap(),
        fx["model"]["init_std"].as_f64().unwrap(),
    );
    weights::save(
        &init::init_weights(&tcfg, seed, std).unwrap(),
        &dir.join("model.safetensors"),
    )
    .unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(
            realdata.join("tokenizers/smollm2-135m").join(f),
            dir.join(f),
        )
        .unwrap();
    }
    dir
}

pub fn real_rows(real: &Path, n: usize) -> Vec<PreferenceRow> {
    let cfg = refdpo::config::DatasetConfig {
        id: real
            .join("ultrafeedback_binarized_sample")
            .to_string_lossy()
            .into_owned(),
        ..Default::default()
    };
    let source = refdpo::data::DataSource::resolve(&cfg, &["train_prefs"]).unwrap();
    refdpo::data::read_split(&source, "train_prefs", n)
        .unwrap()
        .rows
}

pub fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

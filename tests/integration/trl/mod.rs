//! Numbers checked against TRL 1.16 / transformers 5 (fixtures made by
//! tests/fixtures/gen_trl_fixtures.py): token ids, reference log-probs and chat templates on real
//! UltraFeedback rows with the real SmolLM2 tokenizer ([`tokenization`]); the weight formula, every
//! loss, and one full training step ([`training`]).

mod layouts;
mod lora;
mod tokenization;
mod training;

use super::common::{read_json, realdata, repo};
use candle_core::{DType, Device, Tensor};
use refdpo::config::Truncation;
use refdpo::data::PreferenceRow;
use refdpo::dpo::{dpo_loss, LossKind, LossParams, PairLogps};
use refdpo::logprobs::SeqBatch;
use refdpo::model::{init, weights, TransformerConfig};
use refdpo::train::grads::Grads;
use refdpo::train::policy::Policy;
use serde_json::{json, Value};
use std::collections::HashMap;
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

/// The fixture Llama (formula weights, f32, in `tmp`) and its config.
pub fn fixture_model(tmp: &Path, fx: &Value) -> (TransformerConfig, HashMap<String, Tensor>) {
    let model = model_dir(tmp, &realdata(), fx);
    let cfg = TransformerConfig::from_json(&model_config(fx).to_string()).unwrap();
    let w = weights::load(
        &weights::weight_files(&model).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    (cfg, w)
}

/// The first `n` kept pairs of the TRL fixture's first case, as one batch.
pub fn kept_batch(fx: &Value, n: usize) -> SeqBatch {
    let kept = &fx["cases"][0]["kept"];
    let pairs: Vec<_> = (0..n)
        .map(|i| {
            (
                ids(&kept[i]["prompt_ids"]),
                ids(&kept[i]["chosen_ids"]),
                ids(&kept[i]["rejected_ids"]),
            )
        })
        .collect();
    let refs: Vec<_> = pairs
        .iter()
        .map(|(p, c, r)| (&p[..], &c[..], &r[..]))
        .collect();
    SeqBatch::pairs(&refs, 1024, Truncation::KeepStart, Some(0), &Device::Cpu).unwrap()
}

/// One forward/backward of `policy` on `batch` (chosen sequences first) with TRL's sigmoid loss
/// at `beta` against the reference log-probs `rc`, `rr`: returns the summed log-probs and the
/// loss; the gradients go into `grads`.
pub fn sigmoid_step(
    policy: &Policy,
    batch: &SeqBatch,
    beta: f64,
    (rc, rr): (&[f64], &[f64]),
    grads: &mut Grads,
) -> (Vec<f64>, f64) {
    let params = LossParams {
        kind: LossKind::Sigmoid,
        beta,
        label_smoothing: 0.0,
        simpo_gamma: 0.0,
        rpo_alpha: 0.0,
        discopop_tau: 0.05,
    };
    let n = rc.len();
    let mut loss = 0.0;
    let sums = policy
        .forward_backward(batch, true, grads, &mut |s| {
            let x = PairLogps {
                policy_chosen: s[..n].to_vec(),
                policy_rejected: s[n..].to_vec(),
                ref_chosen: rc.to_vec(),
                ref_rejected: rr.to_vec(),
                chosen_len: vec![1.0; n],
                rejected_len: vec![1.0; n],
                chosen_scored_tokens: 1.0,
            };
            let out = dpo_loss(&params, &x)?;
            loss = out.loss;
            Ok(out
                .grad_chosen
                .into_iter()
                .chain(out.grad_rejected)
                .collect())
        })
        .unwrap();
    (sums, loss)
}

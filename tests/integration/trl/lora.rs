//! LoRA against PEFT and TRL (fixtures from tests/fixtures/gen_lora_fixtures.py): PEFT's adapter
//! files read as PEFT wrote them, scoring with the adapter (unmerged and merged) equal to PEFT's,
//! and one DPO step of TRL + PEFT: loss, every adapter gradient, the log-probs after AdamW.

use super::{close, fixture, fixture_model, floats, kept_batch, model_config, sigmoid_step};
use crate::common::repo;
use candle_core::{DType, Device};
use refdpo::logprobs;
use refdpo::model::{lora, OpMode, Transformer, TransformerConfig};
use refdpo::train::optim::{AdamW, AdamWParams};
use refdpo::train::policy::Policy;
use serde_json::Value;
use std::path::Path;

fn peft_logps(case: &Value) -> Vec<f64> {
    let l = &case["peft_logps"];
    floats(&l["chosen"])
        .into_iter()
        .chain(floats(&l["rejected"]))
        .collect()
}

fn assert_close_all(got: &[f64], want: &[f64], rel: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let worst = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / w.abs())
        .fold(0.0, f64::max);
    eprintln!("{what}: worst relative difference {worst:.1e}");
    for (g, w) in got.iter().zip(want) {
        assert!(close(*g, *w, rel), "{what}: {g} vs {w}");
    }
}

#[test]
#[cfg_attr(realdata_absent, ignore = "needs ../shared/realdata")]
fn peft_adapters_score_as_peft_unmerged_and_merged() {
    let fx = fixture("trl_smollm2_llama.json");
    let lf = fixture("trl_lora.json");
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, base) = fixture_model(tmp.path(), &fx);
    let b = kept_batch(&fx, 8);
    for (name, case) in lf["cases"].as_object().unwrap() {
        let dir = repo()
            .join("tests/fixtures")
            .join(case["dir"].as_str().unwrap());
        let saved = lora::read(&dir).unwrap();
        assert!(
            (lora::scale(&saved.lora) - case["scale"].as_f64().unwrap()).abs() < 1e-12,
            "{name}: scale"
        );
        let want = peft_logps(case);
        // unmerged: the adapter on the frozen base, as training and evaluation run it
        let policy = Policy::with_lora(
            &cfg,
            base.clone(),
            &saved.lora,
            saved.tensors.clone(),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        assert_close_all(&policy.score(&b).unwrap(), &want, 1e-5, name);
        // merged: W + s·B·A, as `refdpo merge`, `stats --run` and generate load it
        let mut merged = base.clone();
        lora::merge(&mut merged, &cfg, &saved).unwrap();
        let m = Transformer::new(&cfg, &merged).unwrap();
        let got = logprobs::score(&m, &b, OpMode::Fast).unwrap();
        assert_close_all(&got, &want, 1e-5, name);
    }
}

/// One DPO step with TRL's `DPOTrainer` on a PEFT model against refdpo's LoRA policy.
#[test]
#[cfg_attr(realdata_absent, ignore = "needs ../shared/realdata")]
fn one_lora_step_matches_trl_and_peft() {
    let fx = fixture("trl_smollm2_llama.json");
    let lf = fixture("trl_lora.json");
    let case = &lf["cases"]["all_linear"];
    let step = &case["train_step"];
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, base) = fixture_model(tmp.path(), &fx);
    let saved = lora::read(&repo().join("tests/fixtures/lora/all_linear")).unwrap();
    let policy = Policy::with_lora(
        &cfg,
        base,
        &saved.lora,
        saved.tensors,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        policy.names.len(),
        28,
        "A and B of 7 projections × 2 layers"
    );
    let b = kept_batch(&fx, 2);
    let (rc, rr) = (
        floats(&step["ref_chosen_logps"]),
        floats(&step["ref_rejected_logps"]),
    );
    let mut grads = policy.zero_grads(DType::F32);
    let (sums, loss) = sigmoid_step(
        &policy,
        &b,
        step["beta"].as_f64().unwrap(),
        (&rc, &rr),
        &mut grads,
    );
    let before = &step["policy_logps_before"];
    let want: Vec<f64> = floats(&before["chosen"])
        .into_iter()
        .chain(floats(&before["rejected"]))
        .collect();
    assert_close_all(&sums, &want, 1e-5, "policy log-probs before the step");
    assert!(
        close(loss, step["loss"].as_f64().unwrap(), 1e-4),
        "loss {loss} vs {}",
        step["loss"]
    );
    // every adapter tensor's gradient: L2, sum and |g| sum against torch's (PEFT names)
    let want_grads = step["grads"].as_object().unwrap();
    assert_eq!(
        want_grads.len(),
        policy.names.len(),
        "one gradient per adapter tensor"
    );
    let mut off = Vec::new();
    for (name, want) in want_grads {
        let i = policy.names.iter().position(|n| n == name).unwrap();
        let g: Vec<f32> = grads
            .get(i)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let l2 = g.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        let abs: f64 = g.iter().map(|x| f64::from(x.abs())).sum();
        let sum: f64 = g.iter().map(|&x| f64::from(x)).sum();
        let (wl2, wabs) = (
            want["l2"].as_f64().unwrap(),
            want["abs_sum"].as_f64().unwrap(),
        );
        let rel = [
            (l2 - wl2).abs() / wl2,
            (abs - wabs).abs() / wabs,
            (sum - want["sum"].as_f64().unwrap()).abs() / wabs,
        ]
        .into_iter()
        .fold(0.0, f64::max);
        eprintln!("{name}: gradient worst relative difference {rel:.1e}");
        if rel.is_nan() || rel > 1e-4 {
            off.push(format!("{name}: l2 {l2} vs {wl2} (worst rel {rel:.1e})"));
        }
    }
    assert!(off.is_empty(), "adapter gradients off:\n{}", off.join("\n"));
    let norm = grads.norm().unwrap();
    assert!(
        close(norm, step["grad_norm"].as_f64().unwrap(), 1e-4),
        "grad norm {norm} vs {}",
        step["grad_norm"]
    );
    let mut optim = AdamW::new(
        &policy,
        AdamWParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
        DType::F32,
        false,
    )
    .unwrap();
    optim
        .step(
            &policy,
            &grads,
            step["learning_rate"].as_f64().unwrap(),
            0.0, // unclipped
        )
        .unwrap();
    let after = &step["policy_logps_after"];
    let want: Vec<f64> = floats(&after["chosen"])
        .into_iter()
        .chain(floats(&after["rejected"]))
        .collect();
    assert_close_all(
        &policy.score(&b).unwrap(),
        &want,
        1e-4,
        "log-probs after one step",
    );
}

/// PEFT's own files are what `lora::read` takes; a refdpo adapter written back reads the same.
#[test]
fn adapter_files_round_trip() {
    let dir = repo().join("tests/fixtures/lora/rslora_qv");
    let saved = lora::read(&dir).unwrap();
    assert_eq!(saved.lora.r, 8);
    assert!(saved.lora.use_rslora);
    assert!(saved.lora.target_modules.includes("q_proj"));
    assert!(!saved.lora.target_modules.includes("k_proj"));
    let cfg =
        TransformerConfig::from_json(&model_config(&fixture("trl_smollm2_llama.json")).to_string())
            .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    lora::write(
        tmp.path(),
        &saved.lora,
        &cfg,
        "base",
        "main",
        &saved.tensors,
    )
    .unwrap();
    let back = lora::read(tmp.path()).unwrap();
    assert_eq!(back.lora, saved.lora);
    let named = lora::named_base(tmp.path()).unwrap().unwrap();
    assert_eq!((named.id.as_str(), named.revision), ("base", None));
    assert_eq!(back.tensors.len(), saved.tensors.len());
    for (k, t) in &saved.tensors {
        let (a, b): (Vec<f32>, Vec<f32>) = (
            t.flatten_all().unwrap().to_vec1().unwrap(),
            back.tensors[k].flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert_eq!(a, b, "{k}");
    }
    // what refdpo cannot apply is refused by name
    let cfg_text = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    for (field, value) in [
        ("use_dora", "true"),
        ("bias", "\"all\""),
        ("layers_to_transform", "[0]"),
        ("exclude_modules", "[\"q_proj\"]"),
        ("fan_in_fan_out", "true"),
        ("lora_bias", "true"),
    ] {
        let mut v: Value = serde_json::from_str(&cfg_text).unwrap();
        v[field] = serde_json::from_str(value).unwrap();
        let bad = tmp.path().join(field);
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::write(bad.join("adapter_config.json"), v.to_string()).unwrap();
        let err = lora::read(Path::new(&bad)).err().unwrap().to_string();
        assert!(err.contains(&format!("`{field}`")), "{err}");
    }
}

//! Model families against transformers 5.24 (tests/fixtures/families/, made by
//! gen_family_fixtures.py from tiny seeded random-init models): Qwen3 (per-head q/k norms),
//! Mistral (a sliding window of 8 over sequences of 21–28 tokens), OLMo 2 (post-norms, whole
//! q/k norms), Phi-3 (fused projections), Gemma 2 (soft caps, (1 + w) norms, alternating
//! windows, tied head) and Gemma 3 (per-head q/k norms, a local RoPE base). For each: logits of both op sets, summed completion log-probs, and the gradient of
//! Σ W_i · log p(completion_i) for every parameter, through the trainer's block-wise backward.

use super::common::{max_abs, max_abs_diff, read_json, repo};
use candle_core::{DType, Device, Tensor};
use refdpo::logprobs::SeqBatch;
use refdpo::model::{weights, OpMode, Transformer, TransformerConfig};
use refdpo::train::policy::Policy;

fn ids(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

fn check(family: &str) {
    let dir = repo().join("tests/fixtures/families").join(family);
    let cfg = TransformerConfig::from_file(&dir.join("config.json")).unwrap();
    let tensors = weights::load(
        &weights::weight_files(&dir).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let expected =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let meta = read_json(&dir.join("expected.json"));
    let (prompts, completions) = (ids(&meta["prompts"]), ids(&meta["completions"]));
    let w: Vec<f64> = meta["W"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();

    // 1. logits, sequence by sequence, with the fast and the differentiable op sets
    let model = Transformer::new(&cfg, &tensors).unwrap();
    for (i, (p, c)) in prompts.iter().zip(&completions).enumerate() {
        let seq: Vec<u32> = p.iter().chain(c).copied().collect();
        let input = Tensor::new(seq.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let want = &expected[&format!("logits.{i}")];
        for mode in [OpMode::Fast, OpMode::Differentiable] {
            let got = model
                .forward_logits(&input, mode)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let diff = max_abs_diff(&got, want);
            assert!(
                diff <= 1e-4 * max_abs(want).max(1.0),
                "{family} sequence {i} {mode:?}: max |Δlogit| {diff}"
            );
        }
    }

    // 2. summed completion log-probs and every parameter's gradient, as training computes them
    let seqs: Vec<(&[u32], &[u32])> = prompts
        .iter()
        .zip(&completions)
        .map(|(p, c)| (p.as_slice(), c.as_slice()))
        .collect();
    let batch = SeqBatch::new(&seqs, 0, &Device::Cpu).unwrap();
    let policy = Policy::new(&cfg, tensors.clone(), DType::F32, &Device::Cpu).unwrap();
    let mut grads = policy.zero_grads(DType::F32);
    let sums = policy
        .forward_backward(&batch, true, &mut grads, &mut |_| Ok(w.clone()))
        .unwrap();
    let want_sums = expected["sum_logps"].to_vec1::<f32>().unwrap();
    for (g, w) in sums.iter().zip(&want_sums) {
        assert!(
            (g - *w as f64).abs() <= 1e-4 * (*w as f64).abs(),
            "{family}: sum {g} vs {w}"
        );
    }
    let mut checked = 0;
    for (name, g) in policy.names.iter().zip(grads.iter()) {
        let want = &expected[&format!("grad.{name}")];
        let g = g.unwrap_or_else(|| panic!("{family}: `{name}` got no gradient"));
        let rel = (max_abs_diff(g, want) / max_abs(want)) as f64;
        assert!(
            rel <= 1e-4,
            "{family}: gradient of `{name}` off by {rel:.2e} (relative)"
        );
        checked += 1;
    }
    let params = meta["param_names"].as_array().unwrap().len();
    assert_eq!(
        checked, params,
        "{family}: every parameter of transformers' model is trained"
    );
}

#[test]
fn qwen3_matches_transformers() {
    check("qwen3");
}

#[test]
fn mistral_with_a_sliding_window_matches_transformers() {
    check("mistral");
}

#[test]
fn olmo2_matches_transformers() {
    check("olmo2");
}

#[test]
fn phi3_with_fused_projections_matches_transformers() {
    check("phi3");
}

#[test]
fn gemma2_matches_transformers() {
    check("gemma2");
}

#[test]
fn gemma3_text_matches_transformers() {
    check("gemma3_text");
}

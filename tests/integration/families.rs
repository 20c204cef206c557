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

/// The fixture's sequences (prompt, completion) as one unpadded batch.
fn fixture_batch(prompts: &[Vec<u32>], completions: &[Vec<u32>]) -> SeqBatch {
    let seqs: Vec<(&[u32], &[u32])> = prompts
        .iter()
        .zip(completions)
        .map(|(p, c)| (p.as_slice(), c.as_slice()))
        .collect();
    SeqBatch::new(&seqs, 0, &Device::Cpu).unwrap()
}

/// The summed completion log-probs of a family fixture's three sequences under `cfg`, its
/// weights loaded in `dtype` (the fast op set, as precompute scores).
fn fixture_scores(dir: &std::path::Path, cfg: &TransformerConfig, dtype: DType) -> Vec<f64> {
    let tensors = weights::load(&weights::weight_files(dir).unwrap(), dtype, &Device::Cpu).unwrap();
    let model = Transformer::new(cfg, &tensors).unwrap();
    let meta = read_json(&dir.join("expected.json"));
    let (prompts, completions) = (ids(&meta["prompts"]), ids(&meta["completions"]));
    let batch = fixture_batch(&prompts, &completions);
    refdpo::logprobs::score(&model, &batch, OpMode::Fast).unwrap()
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
    let batch = fixture_batch(&prompts, &completions);
    let policy = Policy::new(&cfg, tensors.clone(), DType::F32, DType::F32, &Device::Cpu).unwrap();
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

/// In bf16, each family's reference scoring (fused ops, the precompute path) against transformers'
/// own bf16 (tests/fixtures/families/bf16.json, gen_family_bf16.py). Measured, relative to the f32
/// sums: transformers' bf16 is 2.7e-4 (Qwen3) to 2.6e-3 (Gemma 3) off; refdpo's bf16 is as far
/// (3.2e-4 to 2.8e-3; at most 2.4x, Phi-3). For Gemma 2 and 3 refdpo follows transformers' own
/// rounding (6.9e-4 and 8.3e-4 apart, half the noise or less: the (1 + w) norms in f32); for the
/// other four the two bf16 results are independent draws of the same size (3.6e-4 to 9.2e-4
/// apart: candle's and torch's kernels round in other orders). Asserted: refdpo's bf16 error is
/// within 3x transformers' and the two within 2x of it, so a misplaced cast (an f32 norm done in
/// bf16, a soft cap rounded twice) fails.
#[test]
fn bf16_scoring_is_as_close_as_transformers_bf16() {
    let fx = read_json(&repo().join("tests/fixtures/families/bf16.json"));
    let mut off = Vec::new();
    for (family, f) in fx["families"].as_object().unwrap() {
        let dir = repo().join("tests/fixtures/families").join(family);
        let cfg = TransformerConfig::from_file(&dir.join("config.json")).unwrap();
        let got = fixture_scores(&dir, &cfg, DType::BF16);
        let floats = |k: &str| -> Vec<f64> {
            f[k].as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        let (hf, f32s) = (floats("bf16_sum_logps"), floats("f32_sum_logps"));
        let rel = |a: &[f64], b: &[f64]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs() / y.abs())
                .fold(0.0, f64::max)
        };
        let (noise, ours, apart) = (rel(&hf, &f32s), rel(&got, &f32s), rel(&got, &hf));
        eprintln!(
            "{family}: vs f32 transformers bf16 {noise:.1e}, refdpo bf16 {ours:.1e}; apart {apart:.1e}"
        );
        if ours > 3.0 * noise || apart > 2.0 * noise {
            off.push(format!(
                "{family}: refdpo bf16 {ours:.1e} from f32 and {apart:.1e} from transformers' bf16, \
                 whose own error is {noise:.1e}"
            ));
        }
    }
    assert!(off.is_empty(), "{off:#?}");
}

/// The family fixtures' weights under edited config.json files (tests/fixtures/families/
/// config_variants.json, made by gen_config_variants.py with transformers 5.24): keys left out,
/// RoPE settings in two places, Gemma's activation key, Mistral's `layer_types` and ignored bias
/// flags, linear RoPE scaling. Each scores as transformers scores it (an audit found each of
/// these read differently, exit 0).
#[test]
fn config_variants_score_as_transformers() {
    let root = repo().join("tests/fixtures/families");
    let all = read_json(&root.join("config_variants.json"));
    let variants = all["variants"].as_array().unwrap();
    assert!(variants.len() >= 20);
    for v in variants {
        let (name, family) = (v["name"].as_str().unwrap(), v["family"].as_str().unwrap());
        let dir = root.join(family);
        let mut cfg = read_json(&dir.join("config.json"));
        for key in v["remove"].as_array().unwrap() {
            cfg.as_object_mut().unwrap().remove(key.as_str().unwrap());
        }
        for (key, value) in v["set"].as_object().unwrap() {
            cfg[key] = value.clone();
        }
        let cfg = TransformerConfig::from_json(&cfg.to_string())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let got = fixture_scores(&dir, &cfg, DType::F32);
        for (g, w) in got.iter().zip(v["sum_logps"].as_array().unwrap()) {
            let w = w.as_f64().unwrap();
            assert!(
                (g - w).abs() <= 1e-5 * w.abs(),
                "{name}: refdpo {g} vs transformers {w}"
            );
        }
    }
}

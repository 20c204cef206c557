//! The forward pass against transformers' fp32 goldens for the real tiny Llama and Qwen2
//! checkpoints in ../shared/realdata (both the fast and the differentiable op sets).

use super::common::{max_abs, max_abs_diff, realdata};
use candle_core::{DType, Device};
use refdpo::model::{weights, OpMode, Transformer, TransformerConfig};

fn check(name: &str) {
    let root = realdata();
    let dir = root.join("models").join(name);
    let cfg = TransformerConfig::from_file(&dir.join("config.json")).unwrap();
    let tensors = weights::load(
        &weights::weight_files(&dir).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let model = Transformer::new(&cfg, &tensors).unwrap();
    let expected =
        candle_core::safetensors::load(dir.join("expected/activations.safetensors"), &Device::Cpu)
            .unwrap();
    let ids = expected["input_ids"].to_dtype(DType::U32).unwrap();
    let want = &expected["logits"];
    for mode in [OpMode::Fast, OpMode::Differentiable] {
        let got = model.forward_logits(&ids, mode).unwrap();
        let diff = max_abs_diff(&got, want);
        let scale = max_abs(want);
        assert!(
            diff <= 1e-4 * scale.max(1.0),
            "{name} {mode:?}: max |Δlogit| {diff} (scale {scale})"
        );
    }
    // The final hidden states too (final_norm), to localize any drift.
    let h = model.forward_hidden(&ids, OpMode::Fast).unwrap();
    let d = max_abs_diff(&h, &expected["final_norm"]);
    assert!(d < 1e-4, "{name}: final_norm differs by {d}");
}

#[test]
#[cfg_attr(realdata_absent, ignore = "needs ../shared/realdata")]
fn tiny_llama_matches_transformers() {
    check("tiny-llama");
}

#[test]
#[cfg_attr(realdata_absent, ignore = "needs ../shared/realdata")]
fn tiny_qwen2_matches_transformers() {
    check("tiny-qwen2");
}

//! Stage two: gradients reach every parameter and match plain autograd; step-0 policy log-probs
//! equal the cache (first loss ln 2); the demo learns; resume is exact; bad caches are refused.

use super::common::{
    demo_config, fails, max_abs, max_abs_diff, ok, precomputed, read_json, refdpo, rewrite_cache,
    train_with,
};
use candle_core::{DType, Device, Tensor};
use refdpo::cache::{self, MappedCache};
use refdpo::logprobs::{self, SeqBatch};
use refdpo::model::{init, OpMode, TransformerConfig};
use refdpo::train::policy::Policy;

pub(super) fn tiny(arch: &str) -> TransformerConfig {
    let tied = arch == "qwen2";
    TransformerConfig::from_json(&format!(
        r#"{{"model_type":"{arch}","vocab_size":37,"hidden_size":16,"intermediate_size":24,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-5,
        "rope_theta":10000.0,"tie_word_embeddings":{tied}}}"#
    ))
    .unwrap()
}

/// How a batch lies.
#[derive(Debug, Clone, Copy)]
enum Layout {
    /// right-padded with id 0
    Padded,
    /// packed end to end
    Packed,
    /// packed, each pair's prompt computed once (as training lays them out)
    Shared,
}

/// Two pairs laid out as `layout` says.
fn batch_laid_out(dev: &Device, layout: Layout) -> SeqBatch {
    let (p1, c1, r1) = (vec![1u32, 5, 7], vec![9u32, 3, 3, 4], vec![2u32, 8]);
    let (p2, c2, r2) = (vec![4u32, 4], vec![30u32], vec![11u32, 12, 13, 14, 36]);
    let pairs = [(&p1[..], &c1[..], &r1[..]), (&p2, &c2, &r2)];
    let t = refdpo::config::Truncation::KeepStart;
    match layout {
        Layout::Padded => SeqBatch::pairs(&pairs, 64, t, Some(0), dev),
        Layout::Packed => SeqBatch::pairs(&pairs, 64, t, None, dev),
        Layout::Shared => SeqBatch::pairs_shared(&pairs, 64, t, dev),
    }
    .unwrap()
}

pub(super) fn batch(dev: &Device) -> SeqBatch {
    batch_laid_out(dev, Layout::Padded)
}

/// d loss/d sums fixed, so the reference gradient is one autograd pass through everything.
pub(super) const W: [f64; 4] = [0.7, -1.3, 0.4, 2.0];

fn naive_grads(policy: &Policy, b: &SeqBatch) -> Vec<Tensor> {
    let m = policy.tracked().unwrap();
    let h = m
        .forward_hidden(&b.input_ids, OpMode::Differentiable)
        .unwrap();
    let rows = b.gather_rows(&h).unwrap();
    let lp = logprobs::token_logps(
        &rows,
        &m.lm_head,
        &b.targets,
        m.cfg.final_softcap,
        OpMode::Fast,
    )
    .unwrap();
    let w: Vec<f32> = b
        .counts
        .iter()
        .zip(W)
        .flat_map(|(&c, w)| std::iter::repeat_n(w as f32, c))
        .collect();
    let n = w.len();
    let loss = (lp * Tensor::from_vec(w, n, &Device::Cpu).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let store = loss.backward().unwrap();
    policy
        .vars
        .iter()
        .map(|v| store.get(v.as_tensor()).unwrap().clone())
        .collect()
}

#[test]
fn blockwise_backward_matches_autograd_and_reaches_every_parameter() {
    let dev = Device::Cpu;
    for arch in ["llama", "qwen2"] {
        let cfg = tiny(arch);
        let mut policy = Policy::new(
            &cfg,
            init::init_weights(&cfg, 3, 0.3).unwrap(),
            DType::F32,
            DType::F32,
            &dev,
        )
        .unwrap();
        let want = naive_grads(&policy, &batch(&dev));
        // padded, packed and with prompts shared; checkpointed with the block recomputed for
        // all sequences at once, one at a time (shared: one pair) and three at a time, then
        // with every block's graph kept
        use Layout::*;
        for (pad, checkpointing, seqs) in [
            (Padded, true, 0),
            (Padded, true, 1),
            (Padded, false, 0),
            (Packed, true, 0),
            (Packed, true, 1),
            (Packed, true, 3),
            (Packed, false, 0),
            (Shared, true, 0),
            (Shared, true, 1),
            (Shared, false, 0),
        ] {
            let b = batch_laid_out(&dev, pad);
            policy.backward_seqs = seqs;
            let mut grads = policy.zero_grads(DType::F32);
            policy
                .forward_backward(&b, checkpointing, &mut grads, &mut |_| Ok(W.to_vec()))
                .unwrap();
            for ((name, g), w) in policy.names.iter().zip(grads.iter()).zip(&want) {
                let g = g.unwrap_or_else(|| panic!("{arch}: no gradient for {name}"));
                // A stored gradient that still carried candle's graph would keep every block's
                // activations alive until the optimizer step (and chain into the moments).
                assert!(
                    !g.track_op(),
                    "{arch}: the gradient of {name} holds its graph"
                );
                let norm = g
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    .sqrt();
                assert!(norm > 0.0, "{arch}: zero gradient for {name}");
                let diff = max_abs_diff(g, w);
                let scale = max_abs(w);
                assert!(
                    diff <= 1e-4 * scale.max(1e-3),
                    "{arch} pad={pad:?} ckpt={checkpointing} seqs={seqs} {name}: {diff} vs {scale}"
                );
            }
        }
    }
}

pub(super) fn final_weights(dir: &std::path::Path) -> Vec<u8> {
    std::fs::read(dir.join("final/model.safetensors")).unwrap()
}

#[test]
fn demo_trains_from_ln2_to_high_heldout_accuracy() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo_config(
        tmp.path(),
        "max_steps = 40\neval_every = 20\nsave_every = 20",
    );
    let cfg_s = cfg.to_str().unwrap();
    ok(&["precompute", "--config", cfg_s, "--quiet"], tmp.path());

    // Step-0 policy log-probs, from the training forward, equal the cached reference log-probs.
    let mapped =
        MappedCache::open(&cache::arrow_path(&tmp.path().join("cache"), "train_prefs")).unwrap();
    let model_dir = tmp.path().join("demo/model");
    let mcfg = TransformerConfig::from_file(&model_dir.join("config.json")).unwrap();
    let files = refdpo::model::weights::weight_files(&model_dir).unwrap();
    let w = refdpo::model::weights::load(&files, DType::F32, &Device::Cpu).unwrap();
    let policy = Policy::new(&mcfg, w, DType::F32, DType::F32, &Device::Cpu).unwrap();
    let rows: Vec<_> = (0..8).map(|i| mapped.to_row(i)).collect();
    let ids: Vec<_> = rows
        .iter()
        .map(|r| (&r.prompt_ids[..], &r.chosen_ids[..], &r.rejected_ids[..]))
        .collect();
    let b = SeqBatch::pairs(
        &ids,
        96,
        refdpo::config::Truncation::KeepStart,
        Some(0),
        &Device::Cpu,
    )
    .unwrap();
    // The training (differentiable) forward, not the fused one that wrote the cache.
    let mut grads = policy.zero_grads(DType::F32);
    let sums = policy
        .forward_backward(&b, true, &mut grads, &mut |s| Ok(vec![0.0; s.len()]))
        .unwrap();
    for (i, r) in rows.iter().enumerate() {
        for (got, want) in [
            (sums[i], r.ref_chosen_logps),
            (sums[8 + i], r.ref_rejected_logps),
        ] {
            assert!(
                (got - want).abs() <= 1e-5 * want.abs(),
                "row {i}: policy {got} vs cached {want}"
            );
        }
    }

    let summary = ok(&["train", "--config", cfg_s, "--quiet"], tmp.path());
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(tmp.path().join("run/metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let first = &lines[0];
    assert_eq!(first["step"], 1);
    assert!(
        (first["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-3,
        "{first}"
    );
    for key in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "grad_norm",
        "learning_rate",
        "tokens_per_second",
    ] {
        assert!(first[key].is_number(), "metrics.jsonl lacks {key}: {first}");
    }
    let eval = lines
        .iter()
        .rev()
        .find(|l| l.get("eval/rewards/accuracies").is_some())
        .unwrap();
    assert!(
        eval["eval/rewards/accuracies"].as_f64().unwrap() >= 0.8,
        "{eval} / {summary}"
    );
    let run = tmp.path().join("run");
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "trainer_state.json",
        "optimizer.safetensors",
    ] {
        assert!(run.join("final").join(f).exists(), "final/{f}");
        assert!(
            run.join("checkpoint-20").join(f).exists(),
            "checkpoint-20/{f}"
        );
    }
    assert_eq!(
        read_json(&run.join("final/trainer_state.json"))["global_step"],
        40
    );
}

/// The fused path's optimizer step (`REFDPO_FUSED=1` on the CPU: the kernels' loops) takes the
/// trainer's own gradients, full and LoRA (transposed matmul gradients among them), with no
/// fallback to the composed update, and trains like the default path.
#[test]
fn the_fused_optimizer_step_takes_the_trainers_gradients() {
    let (tmp, cfg) = precomputed("max_steps = 3");
    let cfg_s = cfg.to_str().unwrap();
    for (name, lora) in [
        ("full", &[][..]),
        ("lora", &["--set", "train.lora.r=4"][..]),
    ] {
        let run = |fused: &str, out: &str| {
            let out_dir = tmp.path().join(out);
            let set = format!("train.out={}", out_dir.display());
            let mut args = vec!["train", "--config", cfg_s, "--set", &set];
            args.extend_from_slice(lora);
            let o = std::process::Command::new(env!("CARGO_BIN_EXE_refdpo"))
                .args(&args)
                .current_dir(tmp.path())
                .env("HF_HUB_OFFLINE", "1")
                .env("REFDPO_FUSED", fused)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
            assert!(o.status.success(), "{name}: {stderr}");
            let losses: Vec<f64> = std::fs::read_to_string(out_dir.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["loss"].as_f64())
                .collect();
            (stderr, losses)
        };
        let (stderr, fused) = run("1", &format!("fused-{name}"));
        assert!(
            !stderr.contains("optimizer step takes the composed ops"),
            "{name}: {stderr}"
        );
        let (_, composed) = run("0", &format!("composed-{name}"));
        assert_eq!(fused.len(), 3, "{name}");
        for (f, c) in fused.iter().zip(&composed) {
            assert!(
                (f - c).abs() < 1e-4,
                "{name}: fused {fused:?}, composed {composed:?}"
            );
        }
    }
}

#[test]
fn resume_continues_exactly() {
    resumes_exactly("");
}

/// `train.optim = "adamw_8bit"`: the checkpoint keeps bitsandbytes' 8-bit state (u8 codes and
/// f32 absmax per 256 values; the embedding's moments and those of small tensors dense), a
/// resumed run ends with the same bytes (with f32 and with bf16 state), and they are not the
/// 32-bit optimizer's.
#[test]
fn eight_bit_adamw_checkpoints_its_state_and_resumes_exactly() {
    let (tmp, eight_bit) = resumes_exactly("optim = \"adamw_8bit\"");
    let st = std::fs::read(tmp.path().join("run/checkpoint-3/optimizer.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    let dtype = |k: &str| st.tensor(k).map(|t| t.dtype()).ok();
    let block = "model.layers.0.mlp.gate_proj.weight";
    assert_eq!(dtype(&format!("m.{block}")), Some(safetensors::Dtype::U8));
    assert_eq!(dtype(&format!("v.{block}")), Some(safetensors::Dtype::U8));
    assert_eq!(
        dtype(&format!("m_absmax.{block}")),
        Some(safetensors::Dtype::F32)
    );
    assert_eq!(
        dtype("m.model.embed_tokens.weight"),
        Some(safetensors::Dtype::F32)
    );
    assert_eq!(dtype("m_absmax.model.embed_tokens.weight"), None);
    assert_eq!(dtype("m.model.norm.weight"), Some(safetensors::Dtype::F32));
    let (_tmp, torch) = resumes_exactly("");
    assert!(
        eight_bit != torch,
        "8-bit moments trained the same weights as f32 ones"
    );
    // bf16 for the moments kept dense: the CPU's loops draw their rounding from the step
    resumes_exactly("optim = \"adamw_8bit\"\nstate_dtype = \"bf16\"");
}

/// Trains 6 steps, then 3 and a resume to 6 (`extra` in `[train]`): the same final weights and
/// train metrics. Returns the folder and the final weights.
fn resumes_exactly(extra: &str) -> (tempfile::TempDir, Vec<u8>) {
    let (tmp, cfg) = precomputed(&format!(
        "lr_schedule = \"constant\"\nsave_every = 3\n{extra}"
    ));
    let cfg_s = cfg.to_str().unwrap();
    train_with(
        cfg_s,
        tmp.path(),
        &["train.max_steps=6", "train.warmup_ratio=0"],
    );
    let full = final_weights(&tmp.path().join("run"));
    let full_metrics = std::fs::read_to_string(tmp.path().join("run/metrics.jsonl")).unwrap();
    std::fs::remove_dir_all(tmp.path().join("run")).unwrap();
    train_with(
        cfg_s,
        tmp.path(),
        &["train.max_steps=3", "train.warmup_ratio=0"],
    );
    train_with(
        cfg_s,
        tmp.path(),
        &["--resume", "train.max_steps=6", "train.warmup_ratio=0"],
    );
    assert!(
        final_weights(&tmp.path().join("run")) == full,
        "resumed run ends with different weights"
    );
    let train_lines = |s: &str| {
        s.lines()
            .filter(|l| !l.contains("eval/"))
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                for k in ["tokens_per_second", "step_seconds"] {
                    v.as_object_mut().unwrap().remove(k);
                }
                v
            })
            .collect::<Vec<_>>()
    };
    let resumed = std::fs::read_to_string(tmp.path().join("run/metrics.jsonl")).unwrap();
    assert_eq!(train_lines(&resumed), train_lines(&full_metrics));
    (tmp, full)
}

#[test]
fn stale_corrupt_and_nonfinite_caches_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo_config(tmp.path(), "max_steps = 2");
    let cfg_s = cfg.to_str().unwrap();
    let err = fails(&["train", "--config", cfg_s], tmp.path());
    assert!(err.contains("refdpo precompute"), "{err}");
    ok(&["precompute", "--config", cfg_s, "--quiet"], tmp.path());
    let err = fails(
        &[
            "train",
            "--config",
            cfg_s,
            "--set",
            "tokenize.max_length=64",
        ],
        tmp.path(),
    );
    assert!(
        err.contains("`max_length`") && err.contains("96") && err.contains("64"),
        "{err}"
    );
    let err = fails(
        &[
            "train",
            "--config",
            cfg_s,
            "--set",
            "tokenize.truncation=keep_end",
        ],
        tmp.path(),
    );
    assert!(err.contains("`truncation`"), "{err}");

    // Non-finite reference log-probs: refused before any step, naming the pair.
    let arrow = cache::arrow_path(&tmp.path().join("cache"), "train_prefs");
    rewrite_cache(&arrow, |rows| {
        rows.iter_mut().for_each(|r| r.ref_chosen_logps = f64::NAN);
    });
    let err = fails(&["train", "--config", cfg_s], tmp.path());
    assert!(err.contains("pair 0 has reference log-probs [NaN"), "{err}");

    // A truncated file: an error that names it, not a panic.
    let bytes = std::fs::read(&arrow).unwrap();
    std::fs::write(&arrow, &bytes[..bytes.len() / 2]).unwrap();
    let err = fails(&["train", "--config", cfg_s], tmp.path());
    assert!(
        err.contains("train_prefs.arrow") && err.contains("corrupted"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// `train.ref = "live"` runs the reference every step; on the same data it gives the cached run's losses.
#[test]
fn live_and_cached_reference_give_the_same_losses() {
    let (tmp, cfg) = precomputed("max_steps = 4");
    let cfg_s = cfg.to_str().unwrap();
    ok(&["train", "--config", cfg_s, "--quiet"], tmp.path());
    let live_out = tmp.path().join("live");
    train_with(
        cfg_s,
        tmp.path(),
        &[
            "train.ref=live",
            &format!("train.out={}", live_out.display()),
        ],
    );
    let losses = |p: &std::path::Path| -> Vec<(String, f64)> {
        std::fs::read_to_string(p.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .flat_map(|v| {
                ["loss", "eval/loss", "rewards/margins"]
                    .into_iter()
                    .filter_map(move |k| {
                        v.get(k)
                            .and_then(|x| x.as_f64())
                            .map(|x| (k.to_string(), x))
                    })
            })
            .collect()
    };
    let (cached, live) = (losses(&tmp.path().join("run")), losses(&live_out));
    assert_eq!(cached.len(), live.len());
    for ((k, a), (_, b)) in cached.iter().zip(&live) {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs().max(1.0),
            "{k}: cached {a} vs live {b}"
        );
    }
    // A list of losses, as TRL mixes them: at step 1 the policy is the reference, so sigmoid
    // is ln 2 and bco_pair 2 ln 2; with weights 1 and 0.5 the first loss is 2 ln 2.
    let mixed = tmp.path().join("mixed");
    train_with(
        cfg_s,
        tmp.path(),
        &[
            r#"train.loss=["sigmoid", "bco_pair"]"#,
            "train.loss_weights=[1.0, 0.5]",
            &format!("train.out={}", mixed.display()),
        ],
    );
    let first = losses(&mixed)
        .into_iter()
        .find(|(k, _)| k == "loss")
        .unwrap()
        .1;
    let want = 2.0 * std::f64::consts::LN_2;
    assert!(
        (first - want).abs() < 1e-6,
        "first mixed loss {first} vs {want}"
    );
    // `refdpo plot` overlays the three runs, one SVG per logged metric.
    let plots = tmp.path().join("plots");
    let (run, live, mix) = (tmp.path().join("run"), live_out.clone(), mixed.clone());
    let out = ok(
        &[
            "plot",
            "--run",
            run.to_str().unwrap(),
            "--run",
            live.to_str().unwrap(),
            "--run",
            mix.to_str().unwrap(),
            "--out",
            plots.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert_eq!(out.lines().count(), 9, "{out}");
    let svg = std::fs::read_to_string(plots.join("loss.svg")).unwrap();
    assert!(
        svg.contains("live") && svg.contains("mixed"),
        "runs named in the legend"
    );
}

/// As transformers' Trainer, an accumulation group never spans two epochs: an epoch's last step
/// takes the micro-batches left in it (`Trainer._inner_training_loop`'s `remainder`), so every
/// epoch ends on a step, and `grad_accum` beyond an epoch's batches makes one step an epoch.
#[test]
fn an_accumulation_group_ends_with_its_epoch() {
    let (tmp, cfg) = precomputed("eval_every = 0");
    let cfg_s = cfg.to_str().unwrap();
    let epochs = |sets: &[&str]| -> Vec<f64> {
        train_with(cfg_s, tmp.path(), sets);
        let log = std::fs::read_to_string(tmp.path().join("run/metrics.jsonl")).unwrap();
        std::fs::remove_dir_all(tmp.path().join("run")).unwrap();
        log.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v.get("eval/loss").is_none())
            .filter_map(|v| v["epoch"].as_f64())
            .collect()
    };
    // One step an epoch (before: 1,000 micro-batches a step, crossing 100 epochs).
    assert_eq!(
        epochs(&["train.grad_accum=1000", "train.max_steps=2"]),
        [1.0, 2.0]
    );
    // Groups of 3 over each epoch's micro-batches: the last group is short, and the run's
    // `ceil(batches / 3)` steps an epoch end on the epoch.
    let by_three = epochs(&["train.grad_accum=3", "train.epochs=2"]);
    let batches = (1.0 / by_three[0] * 3.0).round() as usize;
    assert!(
        !batches.is_multiple_of(3),
        "{batches} micro-batches an epoch: no short group to test"
    );
    let per_epoch = batches.div_ceil(3);
    assert_eq!(by_three.len(), 2 * per_epoch, "{by_three:?}");
    assert_eq!(by_three[per_epoch - 1], 1.0, "{by_three:?}");
    assert_eq!(*by_three.last().unwrap(), 2.0, "{by_three:?}");
    let after = by_three[per_epoch];
    assert!(
        (after - (1.0 + 3.0 / batches as f64)).abs() < 1e-12,
        "{by_three:?}"
    );
}

/// `label_smoothing` with the `sigmoid` loss trains conservative DPO, which TRL 1.16's `sigmoid`
/// does not (it ignores the setting): said at the start, under --quiet too; `robust` reads it as
/// TRL does, unsaid.
#[test]
fn label_smoothing_with_sigmoid_says_it_is_not_trl_1_16s() {
    let (tmp, cfg) = precomputed("max_steps = 1\neval_every = 0\nsave_final = false");
    let cfg_s = cfg.to_str().unwrap();
    let run = |loss: &str, out: &str| {
        let o = refdpo(
            &[
                "train",
                "--config",
                cfg_s,
                "--quiet",
                "--set",
                "train.label_smoothing=0.1",
                "--set",
                &format!("train.loss={loss}"),
                "--set",
                &format!("train.out={out}"),
            ],
            tmp.path(),
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let said = run("sigmoid", "run-sigmoid");
    assert!(
        said.contains("conservative DPO") && said.contains("TRL 1.16"),
        "{said}"
    );
    assert!(!run("robust", "run-robust").contains("conservative DPO"));
}

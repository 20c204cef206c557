//! LoRA end to end: the demo trains adapters from ln 2 to high held-out accuracy; `final/` is a
//! PEFT adapter that `merge` and `stats --run` read; resume with dropout is exact; the block-wise
//! backward gives every adapter tensor autograd's gradient (fused Phi-3 projections included).

use super::common::{
    copy_dir, demo_config, fails, max_abs, max_abs_diff, ok, read_json, train_with,
};
use candle_core::{DType, Device, Tensor};
use refdpo::cache::{self, MappedCache};
use refdpo::config::{LoraConfig, TargetModules, Truncation};
use refdpo::logprobs::{self, SeqBatch};
use refdpo::model::{init, lora, weights, OpMode, Transformer, TransformerConfig};
use refdpo::train::policy::Policy;
use std::collections::HashMap;
use std::path::Path;

const LORA: &str = "[train.lora]\nr = 8\nalpha = 16";

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn demo_lora_trains_merges_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = format!("max_steps = 40\neval_every = 20\nsave_every = 20\n{LORA}");
    let cfg = demo_config(tmp.path(), &extra);
    let cfg_s = cfg.to_str().unwrap();
    ok(&["precompute", "--config", cfg_s, "--quiet"], tmp.path());
    let summary = ok(&["train", "--config", cfg_s, "--quiet"], tmp.path());
    assert!(summary.contains("LoRA:"), "{summary}");
    let run = tmp.path().join("run");
    let lines = metrics(&run);
    // B = 0 at step 0: the policy is the reference, the first loss is ln 2
    let first = lines[0]["loss"].as_f64().unwrap();
    assert!((first - std::f64::consts::LN_2).abs() < 1e-5, "{first}");
    let eval = lines
        .iter()
        .rev()
        .find(|l| l.get("eval/rewards/accuracies").is_some())
        .unwrap();
    assert!(
        eval["eval/rewards/accuracies"].as_f64().unwrap() >= 0.8,
        "{eval} / {summary}"
    );
    // final/ and checkpoints are PEFT adapters with the tokenizer and resume state
    for dir in ["final", "checkpoint-20"] {
        for f in [
            "adapter_config.json",
            "adapter_model.safetensors",
            "tokenizer.json",
            "trainer_state.json",
            "optimizer.safetensors",
            "training_config.toml",
        ] {
            assert!(run.join(dir).join(f).exists(), "{dir}/{f}");
        }
        assert!(!run.join(dir).join("model.safetensors").exists(), "{dir}");
    }
    let adapter_cfg = read_json(&run.join("final/adapter_config.json"));
    assert_eq!(adapter_cfg["peft_type"], "LORA");
    assert_eq!(adapter_cfg["r"], 8);
    assert_eq!(
        adapter_cfg["base_model_name_or_path"],
        tmp.path().join("demo/model").display().to_string()
    );

    // merge: the full model scores as the adapter on its base
    let merged = tmp.path().join("merged");
    let (final_s, merged_s) = (
        run.join("final").display().to_string(),
        merged.display().to_string(),
    );
    ok(
        &["merge", "--adapter", &final_s, "--out", &merged_s],
        tmp.path(),
    );
    assert!(merged.join("config.json").exists());
    assert!(
        !merged.join(".refdpo-merge.lock").exists(),
        "the lock stays behind"
    );
    // a second merge into one --out while the first writes is refused (a helper once found the
    // one that exited 0 publishing the other's weights); a killed merge's leftovers are cleared
    let second = tmp.path().join("merged2");
    let tmp_dir = tmp.path().join("merged2.tmp");
    let held = refdpo::outputs::DirLock::acquire(&tmp_dir, "merge").unwrap();
    std::fs::write(tmp_dir.join("model.safetensors"), b"half-written").unwrap();
    let second_s = second.display().to_string();
    let err = super::common::fails(
        &["merge", "--adapter", &final_s, "--out", &second_s],
        tmp.path(),
    );
    assert!(
        err.contains("is in use") && err.contains("refdpo merge"),
        "{err}"
    );
    drop(held);
    ok(
        &["merge", "--adapter", &final_s, "--out", &second_s],
        tmp.path(),
    );
    assert_eq!(
        std::fs::read(second.join("model.safetensors")).unwrap(),
        std::fs::read(merged.join("model.safetensors")).unwrap()
    );
    assert!(!tmp_dir.exists());
    // never into the adapter's own folder (it would read as the checkpoint's weights)
    let inside = run.join("final/sub").display().to_string();
    let err = super::common::fails(
        &["merge", "--adapter", &final_s, "--out", &inside],
        tmp.path(),
    );
    assert!(err.contains("inside the adapter's folder"), "{err}");
    let model_dir = tmp.path().join("demo/model");
    let mcfg = TransformerConfig::from_file(&model_dir.join("config.json")).unwrap();
    let base = weights::load(
        &weights::weight_files(&model_dir).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let saved = lora::read(&run.join("final")).unwrap();
    let policy = Policy::with_lora(
        &mcfg,
        base,
        &saved.lora,
        saved.tensors,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let m = Transformer::new(
        &mcfg,
        &weights::load(
            &weights::weight_files(&merged).unwrap(),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap(),
    )
    .unwrap();
    let b = batch();
    let (unmerged, merged_lp) = (
        policy.score(&b).unwrap(),
        logprobs::score(&m, &b, OpMode::Fast).unwrap(),
    );
    for (u, w) in unmerged.iter().zip(&merged_lp) {
        assert!((u - w).abs() <= 1e-5 * w.abs(), "{u} vs {w}");
    }
    // a second merge into the same place, and a directory with no adapter, are refused
    let err = fails(
        &["merge", "--adapter", &final_s, "--out", &merged_s],
        tmp.path(),
    );
    assert!(err.contains("not empty"), "{err}");
    // a --base other than the adapter's own is merged into, as PEFT does, and said (also when
    // its folder has the same name); the same model by another spelling of its path is not
    let alt = tmp.path().join("alt/model");
    copy_dir(&merged, &alt);
    let same = tmp.path().join("demo/../demo/model/");
    for (i, (base, other)) in [(&merged, true), (&alt, true), (&same, false)]
        .into_iter()
        .enumerate()
    {
        let out = tmp.path().join(format!("into-{i}"));
        let run = super::common::refdpo(
            &[
                "merge",
                "--adapter",
                &final_s,
                "--base",
                &base.display().to_string(),
                "--out",
                &out.display().to_string(),
            ],
            tmp.path(),
        );
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "{stderr}");
        assert_eq!(
            stderr.contains("the adapter names"),
            other,
            "{base:?}: {stderr}"
        );
    }
    // an adapter out of its run merges into its base at the adapter's `revision`, as PEFT's
    // AutoPeftModelForCausalLM loads it; --revision chooses another
    let hub = tmp.path().join("hf/hub/models--org--tiny");
    for (commit, src, rev) in [("1", &model_dir, "main"), ("2", &alt, "v2")] {
        copy_dir(src, &hub.join("snapshots").join(commit.repeat(40)));
        std::fs::create_dir_all(hub.join("refs")).unwrap();
        std::fs::write(hub.join("refs").join(rev), commit.repeat(40)).unwrap();
    }
    let copied = tmp.path().join("copied/final");
    copy_dir(&run.join("final"), &copied);
    let mut cfg = read_json(&copied.join("adapter_config.json"));
    cfg["base_model_name_or_path"] = "org/tiny".into();
    cfg["revision"] = "v2".into();
    std::fs::write(copied.join("adapter_config.json"), cfg.to_string()).unwrap();
    let copied_s = copied.display().to_string();
    for (i, (extra, rev)) in [
        (vec![], "(v2)"),
        (vec!["--base", "org/tiny"], "(v2)"),
        (vec!["--base", "org/tiny", "--revision", "main"], "(main)"),
    ]
    .into_iter()
    .enumerate()
    {
        let out = tmp.path().join(format!("rev-{i}")).display().to_string();
        let mut args = vec!["merge", "--adapter", &copied_s, "--out", &out];
        args.extend(extra);
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_refdpo"))
            .args(&args)
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HOME", tmp.path().join("hf"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        assert!(stdout.contains(rev), "{args:?}: {stdout}");
    }
    let err = fails(
        &["merge", "--adapter", &merged_s, "--out", "elsewhere"],
        tmp.path(),
    );
    assert!(err.contains("holds no LoRA adapter"), "{err}");
    // an adapter whose alpha is beyond f32 (its merge would overflow): refused by name, nothing
    // written
    let loud = tmp.path().join("loud");
    std::fs::create_dir_all(&loud).unwrap();
    for f in std::fs::read_dir(run.join("final")).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(&f, loud.join(f.file_name().unwrap())).unwrap();
        }
    }
    let mut c = read_json(&loud.join("adapter_config.json"));
    c["lora_alpha"] = 1e300.into();
    std::fs::write(loud.join("adapter_config.json"), c.to_string()).unwrap();
    let out = tmp.path().join("loud-merged");
    let err = fails(
        &[
            "merge",
            "--adapter",
            loud.to_str().unwrap(),
            "--base",
            model_dir.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(
        err.contains("`lora_alpha` is 1e+300, beyond f32's range"),
        "{err}"
    );
    assert!(!out.exists());

    // stats --run scores the merged policy: its mean margin is the final eval's
    let json: serde_json::Value = serde_json::from_str(&ok(
        &[
            "stats",
            "--config",
            cfg_s,
            "--split",
            "test_prefs",
            "--run",
            run.to_str().unwrap(),
            "--json",
        ],
        tmp.path(),
    ))
    .unwrap();
    // ... and the unmerged adapter's own scoring of the test split gives the same mean margin
    let mapped =
        MappedCache::open(&cache::arrow_path(&tmp.path().join("cache"), "test_prefs")).unwrap();
    let rows: Vec<_> = (0..mapped.len()).map(|i| mapped.to_row(i)).collect();
    let ids: Vec<_> = rows
        .iter()
        .map(|r| (&r.prompt_ids[..], &r.chosen_ids[..], &r.rejected_ids[..]))
        .collect();
    let test = SeqBatch::pairs(&ids, 96, Truncation::KeepStart, Some(0), &Device::Cpu).unwrap();
    let sums = policy.score(&test).unwrap();
    let n = rows.len();
    let want = rows
        .iter()
        .enumerate()
        .map(|(i, r)| 0.1 * ((sums[i] - r.ref_chosen_logps) - (sums[n + i] - r.ref_rejected_logps)))
        .sum::<f64>()
        / n as f64;
    let margin = json["policy"]["margin_mean"].as_f64().unwrap();
    assert!(
        (margin - want).abs() <= 1e-5 * want.abs(),
        "{margin} vs {want}"
    );
    assert_eq!(
        json["policy"]["pairs"].as_u64().map_or(n, |p| p as usize),
        n
    );
}

#[test]
fn lora_resume_with_dropout_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = format!("lr_schedule = \"constant\"\nsave_every = 3\n{LORA}\ndropout = 0.1");
    let cfg = demo_config(tmp.path(), &extra);
    let cfg_s = cfg.to_str().unwrap();
    ok(&["precompute", "--config", cfg_s, "--quiet"], tmp.path());
    let adapter = |run: &Path| std::fs::read(run.join("final/adapter_model.safetensors")).unwrap();
    let steps = |n: &str| format!("train.max_steps={n}");
    train_with(cfg_s, tmp.path(), &[&steps("6"), "train.warmup_ratio=0"]);
    let run = tmp.path().join("run");
    let (full, full_lines) = (adapter(&run), metrics(&run));
    std::fs::remove_dir_all(&run).unwrap();
    train_with(cfg_s, tmp.path(), &[&steps("3"), "train.warmup_ratio=0"]);
    train_with(
        cfg_s,
        tmp.path(),
        &["--resume", &steps("6"), "train.warmup_ratio=0"],
    );
    assert!(
        adapter(&run) == full,
        "resumed run ends with other adapters"
    );
    // the interrupted run's closing eval line stays; compare the training lines
    let loss = |l: &[serde_json::Value]| {
        l.iter()
            .filter(|v| v.get("loss").is_some())
            .map(|v| v["loss"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(loss(&metrics(&run)), loss(&full_lines));
}

fn batch() -> SeqBatch {
    batch_laid_out(Some(0))
}

/// Two pairs, right-padded with id 0 (`pad`) or packed end to end (`None`).
fn batch_laid_out(pad: Option<u32>) -> SeqBatch {
    let (p1, c1, r1) = (vec![1u32, 5, 7], vec![9u32, 3, 3, 4], vec![2u32, 8]);
    let (p2, c2, r2) = (vec![4u32, 4], vec![30u32], vec![11u32, 12, 13, 14, 36]);
    SeqBatch::pairs(
        &[(&p1, &c1, &r1), (&p2, &c2, &r2)],
        64,
        Truncation::KeepStart,
        pad,
        &Device::Cpu,
    )
    .unwrap()
}

const W: [f64; 4] = [0.7, -1.3, 0.4, 2.0];

/// Random non-zero adapters (B too, so A gets a gradient).
fn random_adapters(cfg: &TransformerConfig, l: &LoraConfig) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (module, fan_in, fan_out) in lora::target_modules(cfg, &l.target_modules) {
        let (a, b) = lora::peft_names(&module);
        for (name, shape) in [(a, (l.r, fan_in)), (b, (fan_out, l.r))] {
            let v = init::tensor_values(&name, shape.0 * shape.1, 5, 0.2);
            out.insert(name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
        }
    }
    out
}

#[test]
fn blockwise_lora_backward_matches_autograd_for_every_adapter() {
    for (arch, targets) in [
        ("llama", TargetModules::AllLinear),
        (
            "qwen2",
            TargetModules::Names(vec!["q_proj".into(), "down_proj".into()]),
        ),
        ("phi3", TargetModules::AllLinear),
    ] {
        let cfg = TransformerConfig::from_json(&format!(
            r#"{{"model_type":"{arch}","vocab_size":37,"hidden_size":16,"intermediate_size":24,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":false}}"#
        ))
        .unwrap();
        let l = LoraConfig {
            r: 3,
            alpha: 6.0,
            dropout: 0.0,
            target_modules: targets,
            use_rslora: arch == "qwen2",
        };
        let base = init::init_weights(&cfg, 3, 0.3).unwrap();
        let mut policy = Policy::with_lora(
            &cfg,
            base,
            &l,
            random_adapters(&cfg, &l),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let b = batch();
        // plain autograd through the whole tracked model
        let m = policy.tracked().unwrap();
        let h = m
            .forward_hidden(&b.input_ids, OpMode::Differentiable)
            .unwrap();
        let lp = logprobs::token_logps(
            &b.gather_rows(&h).unwrap(),
            &m.lm_head,
            &b.targets,
            None,
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
        let store = (lp * Tensor::from_vec(w, n, &Device::Cpu).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (checkpointing, seqs) in [(true, 0), (true, 1), (false, 0)] {
            policy.backward_seqs = seqs;
            let mut grads = policy.zero_grads(DType::F32);
            policy
                .forward_backward(&b, checkpointing, &mut grads, &mut |_| Ok(W.to_vec()))
                .unwrap();
            for ((name, g), v) in policy.names.iter().zip(grads.iter()).zip(&policy.vars) {
                let g = g.unwrap_or_else(|| panic!("{arch}: no gradient for {name}"));
                let want = store.get(v.as_tensor()).unwrap();
                assert!(max_abs(g) > 0.0, "{arch}: zero gradient for {name}");
                let diff = max_abs_diff(g, want);
                assert!(
                    diff <= 1e-4 * max_abs(want).max(1e-3),
                    "{arch} ckpt={checkpointing} seqs={seqs} {name}: {diff}"
                );
            }
        }
    }
}

#[test]
fn dropout_masks_of_the_recompute_are_the_forwards() {
    let cfg = TransformerConfig::from_json(
        r#"{"model_type":"llama","vocab_size":37,"hidden_size":16,"intermediate_size":24,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
        "rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":false}"#,
    )
    .unwrap();
    let l = LoraConfig {
        r: 3,
        alpha: 6.0,
        dropout: 0.3,
        ..LoraConfig::default()
    };
    let mut policy = Policy::with_lora(
        &cfg,
        init::init_weights(&cfg, 3, 0.3).unwrap(),
        &l,
        random_adapters(&cfg, &l),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    policy.dropout_seed = 11;
    let run = |policy: &mut Policy, pad: Option<u32>, checkpointing: bool, seqs: usize| {
        policy.backward_seqs = seqs;
        let mut grads = policy.zero_grads(DType::F32);
        let sums = policy
            .forward_backward(&batch_laid_out(pad), checkpointing, &mut grads, &mut |_| {
                Ok(W.to_vec())
            })
            .unwrap();
        (sums, grads)
    };
    // the whole graph kept (one forward, one mask per module) is the reference
    let (sums, want) = run(&mut policy, Some(0), false, 0);
    let clean = policy.score(&batch()).unwrap();
    assert!(
        sums.iter().zip(&clean).any(|(a, b)| (a - b).abs() > 1e-4),
        "dropout changed nothing"
    );
    // recomputed, padded or packed (a sequence's masks are the same laid out either way)
    for (pad, checkpointing, seqs) in [
        (Some(0), true, 0),
        (Some(0), true, 1),
        (None, false, 0),
        (None, true, 0),
        (None, true, 1),
    ] {
        let (s, grads) = run(&mut policy, pad, checkpointing, seqs);
        if pad.is_some() {
            assert_eq!(s, sums);
        }
        for (a, b) in s.iter().zip(&sums) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "pad={pad:?}: {s:?} vs {sums:?}"
            );
        }
        for ((name, g), w) in policy.names.iter().zip(grads.iter()).zip(want.iter()) {
            let (g, w) = (g.unwrap(), w.unwrap());
            assert!(
                max_abs_diff(g, w) <= 1e-5 * max_abs(w).max(1e-3),
                "pad={pad:?} ckpt={checkpointing} seqs={seqs} {name}"
            );
        }
    }
}

/// What a saved model carries for transformers and PEFT beyond its weights: the base's
/// `generation_config.json` (stop ids, sampling settings) and `additional_chat_templates/`, in
/// `checkpoint-N/` and `final/` alike; an adapter's `revision` is `model.revision` (PEFT's
/// `AutoPeftModel` loads the base at it; none for the default "main"); a target projection the
/// family lacks (Phi-3 fuses q/k/v) is an error naming the ones it has, not a silent skip.
#[test]
fn saved_models_carry_generation_config_templates_and_revision() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo_config(tmp.path(), "max_steps = 1\nsave_every = 1");
    let cfg_s = cfg.to_str().unwrap();
    ok(&["precompute", "--config", cfg_s, "--quiet"], tmp.path());
    let model = tmp.path().join("demo/model");
    let gen = r#"{"eos_token_id": [2, 5], "do_sample": true, "temperature": 0.7}"#;
    std::fs::write(model.join("generation_config.json"), gen).unwrap();
    std::fs::create_dir_all(model.join("additional_chat_templates")).unwrap();
    std::fs::write(
        model.join("additional_chat_templates/tool_use.jinja"),
        "TOOL",
    )
    .unwrap();
    train_with(cfg_s, tmp.path(), &[]);
    for dir in ["run/final", "run/checkpoint-1"] {
        let d = tmp.path().join(dir);
        let got = std::fs::read_to_string(d.join("generation_config.json")).unwrap();
        assert_eq!(got, gen, "{dir}");
        let t = std::fs::read_to_string(d.join("additional_chat_templates/tool_use.jinja"));
        assert_eq!(t.unwrap(), "TOOL", "{dir}");
    }

    let mcfg = TransformerConfig::from_file(&model.join("config.json")).unwrap();
    let l = LoraConfig {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        target_modules: TargetModules::AllLinear,
        use_rslora: false,
    };
    let adapters =
        lora::init_adapters(&lora::target_modules(&mcfg, &l.target_modules), 2, 0).unwrap();
    for (revision, want) in [
        ("v1.2", serde_json::json!("v1.2")),
        ("main", serde_json::Value::Null),
    ] {
        let out = tmp.path().join(format!("adapter-{revision}"));
        std::fs::create_dir_all(&out).unwrap();
        lora::write(&out, &l, &mcfg, "base", revision, &adapters).unwrap();
        assert_eq!(
            read_json(&out.join("adapter_config.json"))["revision"],
            want
        );
    }

    let phi3 = TransformerConfig::from_json(
        r#"{"model_type":"phi3","vocab_size":8,"hidden_size":8,"intermediate_size":8,
        "num_hidden_layers":1,"num_attention_heads":2}"#,
    )
    .unwrap();
    let names = TargetModules::Names(vec!["q_proj".into(), "down_proj".into()]);
    let e = lora::check_targets_exist(&phi3, &names)
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"q_proj\"") && e.contains("qkv_proj"), "{e}");
    let fine = TargetModules::Names(vec!["qkv_proj".into(), "down_proj".into()]);
    lora::check_targets_exist(&phi3, &fine).unwrap();
}

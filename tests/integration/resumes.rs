//! `--resume` against what can go wrong: a damaged checkpoint refused by name, changed settings
//! named (and a batch size that moves the place in the data, as transformers' Trainer), a run
//! without a checkpoint continued from `final/` or started over, a checkpoint from before
//! checkpoints kept their settings.

use super::common::{fails, precomputed, refdpo, train_with};
use std::path::Path;
use std::process::Command;

/// `train`'s arguments after the config that resume a run of 2 steps to 4.
const RESUME_TO_STEP_4: [&str; 4] = ["--quiet", "--resume", "--set", "train.max_steps=4"];

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A damaged checkpoint under --resume: a weight or moment of another shape, a step count that
/// is not one, an unreadable `trainer_state.json`. Each is an error naming the file and the
/// tensor or key, never a panic or a backtrace, and never a silent fresh start over the run.
#[test]
fn a_damaged_checkpoint_is_refused_by_name_on_resume() {
    let (tmp, cfg) = precomputed("save_every = 2\nsave_final = false");
    let cfg_s = cfg.to_str().unwrap();
    train_with(cfg_s, tmp.path(), &["train.max_steps=2"]);
    let run = tmp.path().join("run");
    let good = tmp.path().join("run.good");
    std::fs::rename(&run, &good).unwrap();
    let edit = |file: &str, key: &str, value: candle_core::Tensor| {
        let path = run.join("checkpoint-2").join(file);
        let mut t = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
        assert!(t.contains_key(key), "{key}");
        t.insert(key.to_string(), value);
        candle_core::safetensors::save(&t, &path).unwrap();
    };
    let cpu = candle_core::Device::Cpu;
    let weight = "model.layers.0.mlp.down_proj.weight";
    // what, the damage, what the error must name
    type Case<'a> = (&'a str, Box<dyn Fn() + 'a>, &'a [&'a str]);
    let state = |edit: &dyn Fn(&mut serde_json::Value)| {
        let path = run.join("checkpoint-2/trainer_state.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut v);
        std::fs::write(&path, v.to_string()).unwrap();
    };
    let cases: [Case<'_>; 12] = [
        (
            "a weight of another shape",
            Box::new(|| {
                let t = candle_core::Tensor::zeros((3, 3), candle_core::DType::F32, &cpu).unwrap();
                edit("model.safetensors", weight, t)
            }),
            &["checkpoint-2", weight, "[3, 3]"],
        ),
        (
            "a moment of another shape",
            Box::new(|| {
                let t = candle_core::Tensor::zeros(2, candle_core::DType::F32, &cpu).unwrap();
                edit("optimizer.safetensors", &format!("v.{weight}"), t)
            }),
            &["optimizer.safetensors", &format!("v.{weight}"), "[2]"],
        ),
        (
            "a negative step count",
            Box::new(|| {
                let t = candle_core::Tensor::new(&[-5f64], &cpu).unwrap();
                edit("optimizer.safetensors", "step", t)
            }),
            &["optimizer.safetensors", "`step`", "-5"],
        ),
        (
            "a NaN in a first moment (its own file's advice is for a downloaded model)",
            Box::new(|| {
                let t = candle_core::Tensor::full(f32::NAN, (64, 128), &cpu).unwrap();
                edit("optimizer.safetensors", &format!("m.{weight}"), t)
            }),
            &[
                "checkpoint `",
                "is damaged",
                "optimizer.safetensors",
                "NaN",
                "Delete it to resume",
            ],
        ),
        (
            "an unreadable trainer state",
            Box::new(|| {
                std::fs::write(run.join("checkpoint-2/trainer_state.json"), "{ not json").unwrap()
            }),
            &["trainer_state.json", "damaged", "--overwrite"],
        ),
        (
            "a negative second moment (it passes the NaN scan, then sqrt gives NaN)",
            Box::new(|| {
                let t = candle_core::Tensor::full(-1f32, (64, 128), &cpu).unwrap();
                edit("optimizer.safetensors", &format!("v.{weight}"), t)
            }),
            &["optimizer.safetensors", &format!("v.{weight}"), "negative"],
        ),
        (
            "a step count other than the trainer state's",
            Box::new(|| {
                let t = candle_core::Tensor::new(&[0f64], &cpu).unwrap();
                edit("optimizer.safetensors", "step", t)
            }),
            &["checkpoint-2", "damaged", "counts 0 steps"],
        ),
        (
            "a trainer state of another step",
            Box::new(|| state(&|v| v["global_step"] = 3.into())),
            &["checkpoint-2", "damaged", "says step 3"],
        ),
        (
            "an epoch past the steps",
            Box::new(|| state(&|v| v["epoch"] = 1_000_000_000_000_000u64.into())),
            &["checkpoint-2", "damaged", "epoch 1000000000000000"],
        ),
        (
            "a place past the epoch's micro-batches",
            Box::new(|| state(&|v| v["batch_in_epoch"] = 1_000_000_000_000_000u64.into())),
            &["checkpoint-2", "damaged", "micro-batch 1000000000000000"],
        ),
        // in range, but not where 2 steps of one micro-batch each end: another data order
        (
            "an epoch other than the steps reach",
            Box::new(|| state(&|v| v["epoch"] = 1.into())),
            &[
                "checkpoint-2",
                "damaged",
                "puts step 2 at epoch 1, micro-batch 2",
                "end at epoch 0, micro-batch 2",
            ],
        ),
        (
            "a micro-batch other than the steps reach",
            Box::new(|| state(&|v| v["batch_in_epoch"] = 10.into())),
            &["checkpoint-2", "damaged", "epoch 0, micro-batch 10"],
        ),
    ];
    for (what, damage, names) in cases {
        if run.exists() {
            std::fs::remove_dir_all(&run).unwrap();
        }
        let copy = Command::new("cp")
            .arg("-r")
            .arg(&good)
            .arg(&run)
            .status()
            .unwrap();
        assert!(copy.success());
        damage();
        let err = fails(
            &[&["train", "--config", cfg_s][..], &RESUME_TO_STEP_4].concat(),
            tmp.path(),
        );
        assert!(
            err.starts_with("error: ")
                && !err.contains("panicked")
                && !err.contains("stack backtrace")
                && !err.contains("re-download")
                // the checkpoint is at fault, not "model:" (an optimizer file) or "train:"
                && !err.contains("damaged: model:")
                && !err.contains("damaged: train:"),
            "{what}: {err}"
        );
        for name in names {
            assert!(err.contains(name), "{what}: `{name}` is not named in {err}");
        }
        assert!(
            !run.join("checkpoint-4").exists(),
            "{what}: the run went on"
        );
    }
}

/// `--resume` under changed settings trains on, but says which keys changed (a batch size also
/// changes the data order); a longer run (`max_steps`) is no change worth a word.
#[test]
fn a_resume_under_changed_settings_names_them() {
    let (tmp, cfg) = precomputed("save_every = 2\neval_every = 0");
    let cfg_s = cfg.to_str().unwrap();
    train_with(cfg_s, tmp.path(), &["train.max_steps=2"]);
    let resume = |sets: &[&str]| {
        let mut args = vec!["train", "--config", cfg_s, "--quiet", "--resume"];
        for s in sets {
            args.extend(["--set", s]);
        }
        let out = refdpo(&args, tmp.path());
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = resume(&["train.max_steps=3"]);
    assert!(!err.contains("warning: resuming"), "{err}");
    // the run's folder by another spelling is the same run
    let same = format!("train.out={}/./run", tmp.path().display());
    let err = resume(&["train.max_steps=4", &same]);
    assert!(tmp.path().join("run/checkpoint-4").exists(), "{err}");
    assert!(!err.contains("warning: resuming"), "{err}");
    let err = resume(&["train.max_steps=5", "train.batch_size=8", "train.beta=0.2"]);
    assert!(
        err.contains("warning: resuming with settings other than those that trained `")
            && err.contains("checkpoint-4` (train.batch_size 16 -> 8")
            && err.contains("train.beta 0.1 -> 0.2")
            && !err.contains("max_steps"),
        "{err}"
    );
    // Compared with the checkpoint's own settings, not the run's latest start: checkpoint-4
    // resumed as it was trained is the uninterrupted run, said by no warning.
    std::fs::remove_dir_all(tmp.path().join("run/final")).unwrap();
    let err = resume(&["train.max_steps=5"]);
    assert!(!err.contains("warning: resuming"), "{err}");
    // A batch size whose epoch is shorter than the steps done: the run goes on from where its
    // steps reach in the new epochs (2 micro-batches of the 160 pairs: 4 steps are 2 epochs), as
    // transformers' Trainer resumes, and step 5 is half into the third epoch.
    std::fs::remove_dir_all(tmp.path().join("run/final")).unwrap();
    let err = resume(&["train.max_steps=5", "train.batch_size=80"]);
    assert!(err.contains("train.batch_size 16 -> 80"), "{err}");
    let log = std::fs::read_to_string(tmp.path().join("run/metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(
        (last["step"].as_u64(), last["epoch"].as_f64()),
        (Some(5), Some(2.5))
    );
    // a full fine-tuning checkpoint resumed as LoRA: refused, saying why
    let out = refdpo(
        &[
            "train",
            "--config",
            cfg_s,
            "--quiet",
            "--resume",
            "--set",
            "train.max_steps=6",
            "--set",
            "train.lora.r=4",
        ],
        tmp.path(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("train.lora.r 0 -> 4")
            && err.contains("saved by a run with other settings"),
        "{err}"
    );
    // A config that ends before the checkpoint (a resume without the run's longer max_steps):
    // `final/` at the checkpoint's step, and a warning naming the settings that train on.
    std::fs::remove_dir_all(tmp.path().join("run/final")).unwrap();
    // and saves a second Ctrl-C cut short are cleared away
    for unfinished in ["checkpoint-9.tmp", "final.tmp"] {
        std::fs::create_dir_all(tmp.path().join("run").join(unfinished).join("x")).unwrap();
    }
    let err = resume(&["train.max_steps=3"]);
    for unfinished in ["checkpoint-9.tmp", "final.tmp"] {
        assert!(
            !tmp.path().join("run").join(unfinished).exists(),
            "{unfinished}"
        );
    }
    assert!(
        err.contains("this config ends at step 3, where `")
            && err.contains("checkpoint-4` was trained toward 4 steps")
            && err.contains("checkpoint-4/training_config.toml"),
        "{err}"
    );
}

/// `--resume` continues from `final/` when the run saved no checkpoint (a finished run given more
/// steps, as "nothing to resume" advises), or from the `final.old/` a kill during its replacement
/// left, and a run killed before any save starts over with a log of its own steps only; all end
/// as the run that went straight to step 6 (it used to start from the base model and append to
/// the old log: every step twice).
#[test]
fn resume_without_a_checkpoint_continues_from_final_or_starts_over_cleanly() {
    let (tmp, cfg) = precomputed("lr_schedule = \"constant\"\neval_every = 0");
    let cfg_s = cfg.to_str().unwrap();
    let run = tmp.path().join("run");
    let train_lines = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v.get("loss").is_some())
            .map(|mut v| {
                for k in ["tokens_per_second", "step_seconds"] {
                    v.as_object_mut().unwrap().remove(k);
                }
                v
            })
            .collect()
    };
    train_with(
        cfg_s,
        tmp.path(),
        &["train.max_steps=6", "train.warmup_ratio=0"],
    );
    let (straight, straight_log) = (bytes(&run.join("final/model.safetensors")), train_lines());
    assert_eq!(straight_log.len(), 6);

    let three = ["train.max_steps=3", "train.warmup_ratio=0"];
    // (the first run's settings, what the first run leaves behind, what the resume says)
    type Case<'a> = (Vec<&'a str>, fn(&Path), &'a str);
    let cases: [Case; 3] = [
        (three.to_vec(), |_| {}, "final (step 3)"),
        (
            [&three[..], &["train.save_final=false"]].concat(),
            |_| {},
            "no checkpoint",
        ),
        // killed while final/ was replaced: final.old/ stands in, a final.tmp/ is not trusted
        (
            three.to_vec(),
            |run| {
                std::fs::rename(run.join("final"), run.join("final.old")).unwrap();
                std::fs::create_dir(run.join("final.tmp")).unwrap();
            },
            "final.old (step 3)",
        ),
    ];
    for (first, left, said) in cases {
        std::fs::remove_dir_all(&run).unwrap();
        train_with(cfg_s, tmp.path(), &first);
        assert!(!run.join("checkpoint-3").exists());
        left(&run);
        let mut args = vec!["train", "--config", cfg_s, "--resume"];
        args.extend([
            "--set",
            "train.max_steps=6",
            "--set",
            "train.warmup_ratio=0",
        ]);
        let out = refdpo(&args, tmp.path());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && err.contains(said), "{said}: {err}");
        assert_eq!(train_lines(), straight_log, "{said}");
        assert!(
            bytes(&run.join("final/model.safetensors")) == straight,
            "{said}"
        );
    }
}

/// A checkpoint saved before checkpoints kept their settings (no `training_config.toml`) whose
/// run's `config.toml` a later, killed start under another batch size rewrote: resumed as it was
/// trained, it ends as the uninterrupted run. An own `training_config.toml` that does not read
/// is a damaged checkpoint.
#[test]
fn a_checkpoint_without_its_own_settings_resumes_under_either_layout() {
    let (tmp, cfg) = precomputed("save_every = 2\neval_every = 0");
    let cfg_s = cfg.to_str().unwrap();
    let run = tmp.path().join("run");
    train_with(cfg_s, tmp.path(), &["train.max_steps=4"]);
    let uninterrupted = bytes(&run.join("final/model.safetensors"));
    for stale in ["final", "checkpoint-4"] {
        std::fs::remove_dir_all(run.join(stale)).unwrap();
    }
    std::fs::remove_file(run.join("checkpoint-2/training_config.toml")).unwrap();
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    // (2 steps of 2 micro-batches would end at micro-batch 4, where the checkpoint is at 2)
    assert!(config.contains("grad_accum = 1"), "{config}");
    std::fs::write(
        run.join("config.toml"),
        config.replace("grad_accum = 1", "grad_accum = 2"),
    )
    .unwrap();
    train_with(cfg_s, tmp.path(), &["--resume", "train.max_steps=4"]);
    assert!(bytes(&run.join("final/model.safetensors")) == uninterrupted);

    std::fs::remove_dir_all(run.join("final")).unwrap();
    std::fs::write(run.join("checkpoint-4/training_config.toml"), "[train\n").unwrap();
    let err = fails(
        &[&["train", "--config", cfg_s][..], &RESUME_TO_STEP_4].concat(),
        tmp.path(),
    );
    assert!(
        err.contains("checkpoint-4` is damaged: its training_config.toml does not read"),
        "{err}"
    );
}

/// Sets `global_step` in the `trainer_state.json` of `run/<saved>`, then resumes toward
/// `steps`: the error.
fn resume_with_step(saved: &str, step: u64, steps: u64, train_sets: &str, extra: &str) -> String {
    let (tmp, cfg) = precomputed(extra);
    let cfg_s = cfg.to_str().unwrap();
    train_with(cfg_s, tmp.path(), &[train_sets]);
    let path = tmp
        .path()
        .join("run")
        .join(saved)
        .join("trainer_state.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["global_step"] = step.into();
    std::fs::write(&path, v.to_string()).unwrap();
    let max = format!("train.max_steps={steps}");
    let err = fails(
        &[
            "train", "--config", cfg_s, "--quiet", "--resume", "--set", &max,
        ],
        tmp.path(),
    );
    assert!(!tmp.path().join(format!("run/checkpoint-{steps}")).exists());
    err
}

/// A newest checkpoint whose `trainer_state.json` names another step than its folder is damaged,
/// refused by name: it was passed over before, and the run resumed from the one before it unsaid.
#[test]
fn a_newest_checkpoint_of_another_step_is_refused_not_passed_over() {
    let err = resume_with_step(
        "checkpoint-4",
        0,
        6,
        "train.max_steps=4",
        "save_every = 2\nsave_final = false",
    );
    assert!(
        err.contains("checkpoint-4") && err.contains("says step 0") && err.contains("damaged"),
        "{err}"
    );
}

/// A `final/` whose state names more steps than its optimizer took (2^63 in a run of 2): a
/// damaged checkpoint, not a finished run to leave as it is.
#[test]
fn a_final_state_past_its_optimizers_steps_is_refused() {
    let err = resume_with_step(
        "final",
        9_223_372_036_854_775_808,
        4,
        "train.max_steps=2",
        "eval_every = 0",
    );
    assert!(
        err.contains("final")
            && err.contains("damaged")
            && err.contains("its optimizer state 2 steps"),
        "{err}"
    );
}

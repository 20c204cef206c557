//! Everyday mishaps: a second run into a run directory, a cache from other inputs, a second writer,
//! Ctrl-C, a full disk (simulated with a file-size limit). Nothing is lost or silently mixed.

use super::common::{
    cache_files, demo_config, fails, ok, precomputed, read_json, refdpo_under, train_with,
};
use refdpo::cache;
use std::path::Path;

/// `train`'s arguments after the config that resume a run of 2 steps to 4.
const RESUME_TO_STEP_4: [&str; 4] = ["--quiet", "--resume", "--set", "train.max_steps=4"];

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn another_run_or_cache_is_refused_and_overwrite_replaces_it() {
    let (tmp, cfg) = precomputed("max_steps = 4\nsave_every = 2");
    let cfg_s = cfg.to_str().unwrap();
    ok(&["train", "--config", cfg_s, "--quiet"], tmp.path());
    let run = tmp.path().join("run");
    let metrics = bytes(&run.join("metrics.jsonl"));

    // The new user's mishap: a second run into the same directory, with a NaN learning rate.
    let err = fails(
        &[
            "train",
            "--config",
            cfg_s,
            "--set",
            "train.learning_rate=nan",
        ],
        tmp.path(),
    );
    assert!(
        err.contains("`train.learning_rate` = NaN") && !err.contains("holds another run"),
        "the bad value is named before anything is touched: {err}"
    );
    let err = fails(&["train", "--config", cfg_s], tmp.path());
    for part in [
        "holds another run",
        "checkpoint-2",
        "metrics.jsonl",
        "--resume",
        "--overwrite",
    ] {
        assert!(err.contains(part), "{part}: {err}");
    }
    assert!(
        bytes(&run.join("metrics.jsonl")) == metrics,
        "metrics.jsonl changed"
    );
    assert!(run.join("checkpoint-4/model.safetensors").exists());

    // --overwrite deletes the old run first: nothing of it is left beside the new one.
    train_with(cfg_s, tmp.path(), &["--overwrite", "train.max_steps=2"]);
    let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = lines
        .lines()
        .filter(|l| !l.contains("eval/"))
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, [1, 2], "{lines}");
    assert!(!run.join("checkpoint-4").exists());
    assert!(run.join("checkpoint-2").exists() && run.join("final").exists());

    // A cache from other inputs (another limit) is refused, naming the field; --overwrite replaces it.
    let out = tmp.path().join("cache");
    let pq = cache::parquet_path(&out, "train_prefs");
    let before = bytes(&pq);
    let err = fails(
        &["precompute", "--config", cfg_s, "--set", "dataset.limit=64"],
        tmp.path(),
    );
    assert!(
        err.contains("train_prefs") && err.contains("`limit`") && err.contains("--overwrite"),
        "{err}"
    );
    assert!(bytes(&pq) == before, "the refused cache was modified");
    ok(
        &[
            "precompute",
            "--config",
            cfg_s,
            "--set",
            "dataset.limit=64",
            "--overwrite",
            "--quiet",
        ],
        tmp.path(),
    );
    let fp = cache::parquet::read_fingerprint(&pq).unwrap();
    assert_eq!(fp.limit, 64);
}

#[test]
fn a_nonfinite_stop_names_a_checkpoint_of_this_run_only() {
    let (tmp, cfg) = precomputed("save_every = 2\nlr_schedule = \"constant_with_warmup\"");
    let cfg_s = cfg.to_str().unwrap();
    train_with(cfg_s, tmp.path(), &["train.max_steps=2"]);
    // A learning rate that overflows the weights: step 3's update, then step 4's loss is NaN.
    let run = tmp.path().join("run");
    let err = fails(
        &[
            "train",
            "--config",
            cfg_s,
            "--resume",
            "--set",
            "train.max_steps=4",
            "--set",
            "train.learning_rate=1e30",
        ],
        tmp.path(),
    );
    let ckpt = run.join("checkpoint-2");
    assert!(
        err.contains("loss is NaN at step 4")
            && err.contains(&format!(
                "this run's last good checkpoint is {}",
                ckpt.display()
            )),
        "{err}"
    );
    // A new run over this one with `sets`: its error.
    let overwrite = |sets: &[&str]| {
        let mut args = vec!["train", "--config", cfg_s, "--overwrite"];
        for s in sets {
            args.extend(["--set", s]);
        }
        fails(&args, tmp.path())
    };
    // A new run into the same directory (it must be asked for) has no checkpoint of its own.
    let err = overwrite(&["train.learning_rate=1e30", "train.save_every=10"]);
    assert!(
        err.contains("is NaN at step") && err.contains("this run has saved no checkpoint"),
        "{err}"
    );
    // Before the first update the learning rate cannot be the cause (and clipping is on): the
    // hint names β, which scales the loss's gradient past f32.
    let err = overwrite(&["train.beta=1e30"]);
    assert!(
        err.contains("at step 1")
            && err.contains("lower train.beta (1e30)")
            && !err.contains("learning_rate"),
        "{err}"
    );
    // DiscoPOP's temperature at the low end of its range: the hint names it, not only β (fuzzer)
    let err = overwrite(&["train.loss=\"discopop\"", "train.discopop_tau=1e-37"]);
    assert!(
        err.contains("at step 1") && err.contains("raise train.discopop_tau (1e-37)"),
        "{err}"
    );
    // A weight decay that, with the learning rate, scales every weight past -1 per step: the
    // hint names it (fuzzer: it said only "lower train.learning_rate")
    let err = overwrite(&["train.weight_decay=1e30"]);
    assert!(
        err.contains("is NaN at step") && err.contains("lower train.weight_decay (1e30)"),
        "{err}"
    );
    // An update overflows the weights (a finite loss and norm before it; step 1 is warmup, at
    // rate 0): neither its checkpoint nor `final/` is written, and the error names the last good
    // checkpoint.
    let err = overwrite(&[
        "train.max_steps=3",
        "train.save_every=1",
        "train.learning_rate=3e38",
        "train.weight_decay=0.01",
    ]);
    assert!(
        err.contains("the update made `")
            && err.contains("NaN or Inf (nothing of it is saved) at step 2")
            && err.contains(&format!(
                "this run's last good checkpoint is {}",
                run.join("checkpoint-1").display()
            )),
        "{err}"
    );
    assert!(!run.join("checkpoint-2").exists() && !run.join("final").exists());
}

#[test]
fn a_full_disk_names_the_file_keeps_earlier_outputs_and_the_rerun_matches() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo_config(tmp.path(), "save_every = 2");
    let cfg_s = cfg.to_str().unwrap();
    let out = tmp.path().join("cache");

    // A clean reference: the cache and a 4-step run.
    ok(&["precompute", "--config", cfg_s, "--quiet"], tmp.path());
    let files = cache_files(&out);
    let clean: Vec<Vec<u8>> = files.iter().map(|f| bytes(f)).collect();
    train_with(cfg_s, tmp.path(), &["train.max_steps=4"]);
    let clean_final = bytes(&tmp.path().join("run/final/model.safetensors"));
    std::fs::remove_dir_all(&out).unwrap();
    std::fs::remove_dir_all(tmp.path().join("run")).unwrap();

    // Stage one at a 30 KiB file limit: the 10 KiB chunks and the 16 KiB parquet fit, the 48 KiB
    // train_prefs.arrow does not.
    let r = refdpo_under(
        "-f 30",
        &["precompute", "--config", cfg_s, "--quiet"],
        tmp.path(),
    );
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success(), "{err}");
    assert!(
        err.contains("cannot write")
            && err.contains("train_prefs.arrow")
            && err.contains("too large"),
        "{err}"
    );
    assert!(!cache::arrow_path(&out, "train_prefs")
        .with_extension("arrow.tmp")
        .exists());
    let partial = out.join(".partial-train_prefs");
    let chunks = std::fs::read_dir(&partial).unwrap().count();
    assert!(chunks >= 5, "finished chunks kept: {chunks} entries");
    ok(&["precompute", "--config", cfg_s, "--quiet"], tmp.path());
    let report = read_json(&out.join("report.json"));
    assert!(
        report["train_prefs"]["resumed_chunks"].as_u64().unwrap() >= 5,
        "{report}"
    );
    for (f, want) in files.iter().zip(&clean) {
        assert!(bytes(f) == *want, "{} differs after the rerun", f.display());
    }

    // Stage two: checkpoint-2 is written, then checkpoint-4's optimizer state (692 KiB) does not
    // fit a 500 KiB limit; checkpoint-2 stays whole and the resumed run ends like the clean one.
    train_with(cfg_s, tmp.path(), &["train.max_steps=2"]);
    let run = tmp.path().join("run");
    let ckpt2 = bytes(&run.join("checkpoint-2/optimizer.safetensors"));
    let r = refdpo_under(
        "-f 500",
        &[&["train", "--config", cfg_s][..], &RESUME_TO_STEP_4].concat(),
        tmp.path(),
    );
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success(), "{err}");
    assert!(
        err.contains("cannot write") && err.contains("optimizer.safetensors"),
        "{err}"
    );
    assert!(bytes(&run.join("checkpoint-2/optimizer.safetensors")) == ckpt2);
    assert!(!run.join("checkpoint-4").exists() && !run.join("checkpoint-4.tmp").exists());
    train_with(cfg_s, tmp.path(), &["--resume", "train.max_steps=4"]);
    assert!(bytes(&run.join("final/model.safetensors")) == clean_final);
}

/// Chunks left by an interrupted stage one are reused only where they hold the very pairs this
/// run scores: after a change of `precompute.chunk_pairs`, or with one chunk copied over another,
/// the rerun scores them again and ends with a clean run's bytes (it used to take them as they
/// were: duplicated rows, exit 0).
#[test]
fn leftover_chunks_of_other_pairs_are_scored_again() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo_config(tmp.path(), "");
    let cfg_s = cfg.to_str().unwrap();
    let out = tmp.path().join("cache");
    let partial = out.join(".partial-train_prefs");
    let precompute = |sets: &[&str]| {
        let mut args = vec!["precompute", "--config", cfg_s, "--quiet"];
        for s in sets {
            args.extend(["--set", s]);
        }
        ok(&args, tmp.path())
    };
    // Interrupted by a 30 KiB file limit: five finished chunks of 32 pairs stay behind.
    let interrupted = || {
        let _ = std::fs::remove_dir_all(&out);
        let args = ["precompute", "--config", cfg_s, "--quiet"];
        let r = refdpo_under("-f 30", &args, tmp.path());
        assert!(!r.status.success());
        assert!(partial.join("chunk-00004.arrow").exists());
    };
    let clean = |sets: &[&str]| -> Vec<Vec<u8>> {
        let dir = tmp.path().join("clean");
        let _ = std::fs::remove_dir_all(&dir);
        let at = format!("precompute.out={}", dir.display());
        precompute(&[&[at.as_str()], sets].concat());
        cache_files(&dir).iter().map(|f| bytes(f)).collect()
    };
    let rerun = |sets: &[&str]| -> Vec<Vec<u8>> {
        precompute(sets);
        cache_files(&out).iter().map(|f| bytes(f)).collect()
    };

    // The clean runs first (the first one writes the demo's files too).
    let seven = ["precompute.chunk_pairs=7"];
    let (clean_32, clean_7) = (clean(&[]), clean(&seven));

    interrupted();
    assert!(rerun(&seven) == clean_7, "chunks of 32 pairs reused as 7");

    interrupted();
    std::fs::copy(
        partial.join("chunk-00000.arrow"),
        partial.join("chunk-00002.arrow"),
    )
    .unwrap();
    assert!(rerun(&[]) == clean_32, "a chunk copied over another reused");
}

/// Outputs never replace the files a run reads: a single-file dataset named as a cache split's
/// file in `precompute.out`, or the `--config` file itself named `config.toml` there (found
/// with the fuzzer; both had been written over, with exit 0 and no `--overwrite`).
#[test]
fn outputs_never_replace_the_dataset_file_or_the_config_file() {
    let (tmp, cfg) = precomputed("");
    let t = tmp.path();
    let mine = t.join("mine");
    std::fs::create_dir(&mine).unwrap();
    let data = mine.join("train_prefs.parquet");
    std::fs::copy(
        t.join("demo/dataset/data/train_prefs-00000-of-00001.parquet"),
        &data,
    )
    .unwrap();
    let before = bytes(&data);
    let cfg_s = cfg.to_str().unwrap();
    for extra in [&[][..], &["--overwrite"][..]] {
        let mut args = vec![
            "precompute",
            "--config",
            cfg_s,
            "--set",
            "dataset.id=mine/train_prefs.parquet",
            "--set",
            "precompute.out=\"mine\"",
        ];
        args.extend(extra);
        let err = fails(&args, t);
        assert!(err.contains("is a data file of the dataset"), "{err}");
        assert_eq!(bytes(&data), before, "{extra:?}: the data file changed");
    }

    // the pipeline file itself, `config.toml` in the folder it names for its outputs
    let text = std::fs::read_to_string(&cfg).unwrap() + "\n# my notes\n";
    for (command, key) in [("precompute", "precompute.out"), ("train", "train.out")] {
        let dir = t.join(format!("own-{command}"));
        std::fs::create_dir(&dir).unwrap();
        let own = dir.join("config.toml");
        std::fs::write(&own, &text).unwrap();
        let set = format!("{key}=\"{}\"", dir.display());
        let err = fails(
            &[command, "--config", own.to_str().unwrap(), "--set", &set],
            t,
        );
        assert!(err.contains("is the --config file"), "{command}: {err}");
        assert_eq!(std::fs::read_to_string(&own).unwrap(), text, "{command}");
    }

    let err = fails(
        &[
            "precompute",
            "--config",
            cfg_s,
            "--set",
            "precompute.out=\"\"",
        ],
        t,
    );
    assert!(err.contains("`precompute.out` is empty"), "{err}");
}

/// A checkpoint whose optimizer state is finite and absurd (a first moment of 3e38): the first
/// step after resuming from it overflows, and the error says that checkpoint may be what is
/// wrong, not that it is "this run's last good checkpoint" (fuzzer).
#[test]
fn a_divergence_right_after_a_resume_names_the_checkpoint_as_a_suspect() {
    use candle_core::{DType, Device};
    use refdpo::model::weights;
    let (tmp, cfg) = precomputed("save_every = 1\nlr_schedule = \"constant\"");
    let cfg_s = cfg.to_str().unwrap();
    train_with(cfg_s, tmp.path(), &["train.max_steps=1"]);
    let ckpt = tmp.path().join("run/checkpoint-1");
    let file = ckpt.join("optimizer.safetensors");
    let mut w = weights::load(std::slice::from_ref(&file), DType::F32, &Device::Cpu).unwrap();
    let key = "m.model.norm.weight";
    let m = w[key].ones_like().unwrap().affine(3e38, 0.0).unwrap();
    w.insert(key.into(), m.to_dtype(w[key].dtype()).unwrap());
    weights::save(&w, &file).unwrap();
    let err = fails(
        &[
            "train",
            "--config",
            cfg_s,
            "--resume",
            "--set",
            "train.max_steps=3",
        ],
        tmp.path(),
    );
    assert!(
        err.contains("at step 2")
            && err.contains(&format!(
                "the first step after resuming from {}",
                ckpt.display()
            ))
            && !err.contains("last good checkpoint"),
        "{err}"
    );
}

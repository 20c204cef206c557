//! Stage one end to end on the embedded demo: outputs, report, fingerprint, kill -9 resume.

use super::common::{cache_files, demo_config, fails, ok, precomputed, read_json, refdpo};
use refdpo::cache::{self, MappedCache};
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn precompute_writes_a_cache_that_conforms_to_the_spec() {
    let (tmp, cfg) = precomputed("");
    let cfg_s = cfg.to_str().unwrap();
    let out = tmp.path().join("cache");
    for split in ["train_prefs", "test_prefs"] {
        let rows = cache::parquet::read(&cache::parquet_path(&out, split)).unwrap();
        let mapped = MappedCache::open(&cache::arrow_path(&out, split)).unwrap();
        assert_eq!(mapped.len(), rows.len());
        assert_eq!(
            (0..rows.len())
                .map(|i| mapped.to_row(i))
                .collect::<Vec<_>>(),
            rows
        );
        let fp = cache::parquet::read_fingerprint(&cache::parquet_path(&out, split)).unwrap();
        assert_eq!(fp.split, split);
        assert_eq!(fp.max_length, 96);
        assert_eq!(fp, mapped.fingerprint);
        assert!(rows
            .iter()
            .all(|r| r.ref_chosen_logps < 0.0 && r.ref_rejected_logps < 0.0));
        assert!(rows
            .iter()
            .all(|r| r.prompt_ids.len() + r.chosen_ids.len() <= 96));
        assert!(
            rows.windows(2).all(|w| w[0].row < w[1].row),
            "rows stay in source order"
        );
    }
    let report = read_json(&out.join("report.json"));
    let train = &report["train_prefs"];
    for key in [
        "rows_read",
        "rows_kept",
        "dropped",
        "tokens",
        "seconds",
        "tokens_per_second",
    ] {
        assert!(!train[key].is_null(), "report.json lacks {key}");
    }
    assert_eq!(train["rows_read"], 160);
    // The demo contains one empty assistant turn and one identical pair per 97 rows.
    assert_eq!(train["dropped"]["empty_assistant_turn"], 2);
    assert_eq!(train["dropped"]["identical_responses"], 2);
    assert_eq!(train["rows_kept"], 156);
    // A second run finds the cache up to date.
    ok(&["precompute", "--config", cfg_s, "--quiet"], tmp.path());
    assert_eq!(
        read_json(&out.join("report.json"))["train_prefs"]["up_to_date"],
        true
    );
    // show prints one example.
    let shown = ok(&["show", "--config", cfg_s, "--index", "3"], tmp.path());
    assert!(
        shown.contains("<|im_start|>assistant") && shown.contains("chosen_ids"),
        "{shown}"
    );
}

#[test]
fn killed_precompute_resumes_to_identical_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo_config(tmp.path(), "");
    let cfg_s = cfg.to_str().unwrap();
    let out = tmp.path().join("cache");
    ok(&["precompute", "--config", cfg_s, "--quiet"], tmp.path());
    let files = cache_files(&out);
    let clean: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    std::fs::remove_dir_all(&out).unwrap();
    // kill -9 once given chunks are on disk (so each kill lands mid-split), each run resuming the
    // last; then let it finish: the finished chunks are reused and the result is byte-identical.
    let spawn_and_kill_after = |chunk: &std::path::Path| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_refdpo"))
            .args(["precompute", "--config", cfg_s, "--quiet"])
            .current_dir(tmp.path())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(300);
        while !chunk.exists() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "precompute ended before {} appeared",
                chunk.display()
            );
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {}",
                chunk.display()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().unwrap();
        child.wait().unwrap();
    };
    let chunk = |split: &str, k: usize| out.join(format!(".partial-{split}/chunk-{k:05}.arrow"));
    for k in [0, 2, 3] {
        spawn_and_kill_after(&chunk("train_prefs", k));
    }
    // every split to score is begun before the first is scored: a run stopped between splits
    // leaves the next one unfinished, not absent
    assert!(out.join(".partial-test_prefs/fingerprint.json").exists());
    // This run finishes the train split from the 4 chunks on disk, then dies in the test split.
    spawn_and_kill_after(&chunk("test_prefs", 0));
    // training on it is refused (it once trained without evaluation, with only a note)
    let err = fails(&["train", "--config", cfg_s], tmp.path());
    assert!(
        err.contains("has not finished the `test_prefs` split"),
        "{err}"
    );
    let report = read_json(&out.join("report.json"));
    let resumed = report["train_prefs"]["resumed_chunks"].as_u64().unwrap();
    assert!(
        resumed >= 4,
        "train split resumed {resumed} chunks: {report}"
    );
    ok(&["precompute", "--config", cfg_s, "--quiet"], tmp.path());
    let report = read_json(&out.join("report.json"));
    let resumed = report["test_prefs"]["resumed_chunks"].as_u64().unwrap();
    assert!(
        resumed >= 1,
        "test split resumed {resumed} chunks: {report}"
    );
    for (f, want) in files.iter().zip(&clean) {
        assert!(
            std::fs::read(f).unwrap() == *want,
            "{} differs after resume",
            f.display()
        );
    }
    assert!(!out.join(".partial-train_prefs").exists());
}

#[test]
fn bad_inputs_fail_fast_with_named_causes() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo_config(tmp.path(), "");
    let cfg_s = cfg.to_str().unwrap();
    let err = fails(
        &["precompute", "--config", cfg_s, "--set", "train.betta=0.2"],
        tmp.path(),
    );
    assert!(err.contains("train.betta"), "{err}");
    let err = fails(&["precompute", "--config", "no/such.toml"], tmp.path());
    assert!(err.contains("no/such.toml"), "{err}");
    // A missing test split fails before the train split is scored: nothing is written.
    let err = fails(
        &[
            "precompute",
            "--config",
            cfg_s,
            "--set",
            "dataset.test_split=nope",
        ],
        tmp.path(),
    );
    assert!(err.contains("nope"), "{err}");
    let cache_dir = tmp.path().join("cache");
    assert!(
        !cache_dir.join("train_prefs.parquet").exists()
            && !cache_dir.join(".partial-train_prefs").exists(),
        "the train split was scored before the missing test split was found"
    );
    let err = fails(
        &[
            "precompute",
            "--config",
            cfg_s,
            "--set",
            "demo.generate=false",
            "--set",
            "dataset.id=HuggingFaceH4/nope",
        ],
        tmp.path(),
    );
    assert!(
        err.contains("HuggingFaceH4/nope") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
    // A parquet file with the wrong schema.
    let bad = tmp.path().join("bad/data");
    std::fs::create_dir_all(&bad).unwrap();
    ok(
        &[
            "precompute",
            "--config",
            cfg_s,
            "--set",
            "dataset.limit=4",
            "--quiet",
        ],
        tmp.path(),
    );
    std::fs::copy(
        tmp.path().join("cache/train_prefs.parquet"),
        bad.join("train_prefs-00000-of-00001.parquet"),
    )
    .unwrap();
    let ds = tmp.path().join("bad");
    let err = fails(
        &[
            "precompute",
            "--config",
            cfg_s,
            "--set",
            &format!("dataset.id={}", ds.display()),
        ],
        tmp.path(),
    );
    assert!(err.contains("column `chosen` is missing"), "{err}");
    let out = refdpo(
        &[
            "precompute",
            "--config",
            cfg_s,
            "--set",
            "tokenize.truncation=middle",
        ],
        tmp.path(),
    );
    assert!(!out.status.success());
}

/// The model's `config.json` and the tokenizer's settings files shape the cached log-probs and
/// ids as the weights do: an edit of either makes the cache stale (stage two refuses it naming
/// the field, precompute scores it again). Before, the edited config trained from a cache of the
/// old one with a first loss of 0.6825, not ln 2.
#[test]
fn an_edited_model_config_or_tokenizer_config_makes_the_cache_stale() {
    let (tmp, cfg) = precomputed("max_steps = 1");
    let cfg_s = cfg.to_str().unwrap();
    let model = tmp.path().join("demo/model");
    let report =
        || read_json(&tmp.path().join("cache/report.json"))["train_prefs"]["up_to_date"].clone();
    for (file, field) in [
        ("config.json", "model_config_sha256"),
        ("tokenizer_config.json", "tokenizer_config_sha256"),
    ] {
        let path = model.join(file);
        let mut v = read_json(&path);
        if file == "config.json" {
            v["rms_norm_eps"] = 0.5.into();
        } else {
            v["eos_token"] = "<|im_start|>".into();
        }
        std::fs::write(&path, v.to_string()).unwrap();
        let err = fails(&["train", "--config", cfg_s, "--quiet"], tmp.path());
        assert!(err.contains(field), "{err}");
        // as for other weights: another model's cache, replaced only when asked
        let err = fails(&["precompute", "--config", cfg_s, "--quiet"], tmp.path());
        assert!(err.contains(field) && err.contains("--overwrite"), "{err}");
        ok(
            &["precompute", "--config", cfg_s, "--quiet", "--overwrite"],
            tmp.path(),
        );
        assert_eq!(report(), false, "{file}: the cache was kept");
        ok(&["precompute", "--config", cfg_s, "--quiet"], tmp.path());
        assert_eq!(report(), true);
    }
    ok(&["train", "--config", cfg_s, "--quiet"], tmp.path());
    let line = std::fs::read_to_string(tmp.path().join("run/metrics.jsonl")).unwrap();
    let loss = serde_json::from_str::<serde_json::Value>(line.lines().next().unwrap()).unwrap()
        ["loss"]
        .as_f64()
        .unwrap();
    assert!((loss - std::f64::consts::LN_2).abs() < 1e-6, "{loss}");
}

/// Outside the checkout the default pipeline is not there: said, with the way out.
#[test]
fn the_default_pipeline_outside_the_checkout_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let err = fails(&["precompute", "--quiet"], tmp.path());
    assert!(
        err.contains("no `pipelines/demo.toml` here") && err.contains("--config FILE"),
        "{err}"
    );
}

/// A `train` refused before it writes anything (here: no cache yet) leaves no `train.out`
/// behind, lock file included.
#[test]
fn a_refused_train_leaves_no_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo_config(tmp.path(), "");
    let err = fails(
        &["train", "--config", cfg.to_str().unwrap(), "--quiet"],
        tmp.path(),
    );
    assert!(err.contains("no cache"), "{err}");
    assert!(!tmp.path().join("run").exists());
}

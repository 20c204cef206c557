//! What an attacker, or a slip, can hand refdpo besides damaged models and data (`hostile.rs`):
//! numbers at the ends of their types, files that are not files, links where outputs go, an
//! output path onto an input. Each is a clear `error:` naming the thing (exit 1: no panic, no
//! abort, no hang), and nothing is written where it must not be.

use crate::common::{demo_config, ok, refdpo};
use crate::hostile::model_copy;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `refdpo args` fails as a program should (exit 1, one `error:`, no panic), naming each of
/// `names`, within `secs` seconds (a read that blocks or never ends is a failure too).
fn refused_within(secs: u64, args: &[&str], cwd: &Path, names: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_refdpo"))
        .args(args)
        .current_dir(cwd)
        .env("HF_HUB_OFFLINE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("refdpo {args:?} still running after {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(
        err.contains("error: ") && !err.contains("panicked"),
        "{args:?}: {err}"
    );
    for name in names {
        assert!(err.contains(name), "{args:?}: `{name}` not named in {err}");
    }
    err
}

#[test]
fn numbers_at_the_ends_of_their_types_are_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo_config(tmp.path(), "max_steps = 2");
    let cfg_s = cfg.to_str().unwrap();
    ok(&["precompute", "--config", cfg_s, "--quiet"], tmp.path());
    let huge = u64::MAX.to_string();
    let shard = format!("{}/{huge}", u64::MAX - 1);
    // `--shard` near usize::MAX (its range multiplied i·n): an empty shard, not an overflow
    let out = refdpo(
        &["precompute", "--config", cfg_s, "--quiet", "--overwrite"],
        tmp.path(),
    );
    assert!(out.status.success());
    let sharded = format!("precompute.out={}", tmp.path().join("s").display());
    let out = refdpo(
        &[
            "precompute",
            "--config",
            cfg_s,
            "--quiet",
            "--set",
            &sharded,
            "--shard",
            &shard,
        ],
        tmp.path(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    // `show --index` at u64::MAX: no such row
    let out = refdpo(&["show", "--config", cfg_s, "--index", &huge], tmp.path());
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("panicked"), "{text}");
    // a demo split too large to make in memory
    let rows = "demo.train_rows=1099511627776";
    refused_within(
        60,
        &["precompute", "--config", cfg_s, "--set", rows],
        tmp.path(),
        &["demo.train_rows", "1000000"],
    );
    // a chunk size no memory holds: the chunk is never larger than the split
    let chunk = format!("precompute.out={}", tmp.path().join("c").display());
    let mut args = vec!["precompute", "--config", cfg_s, "--quiet"];
    for set in [chunk.as_str(), "precompute.chunk_pairs=1099511627776"] {
        args.extend(["--set", set]);
    }
    ok(&args, tmp.path());
    // optimizer and loss numbers f32 cannot hold (the loss's gradients are f32: 1e39 was a NaN
    // blamed on the learning rate, 1e-320 a beta of 0 that trained nothing)
    for set in [
        "train.learning_rate=1e39",
        "train.adam_epsilon=1e-300",
        "train.beta=1e39",
        "train.beta=1e-320",
        "train.simpo_gamma=1e308",
    ] {
        let key = set.split('=').next().unwrap();
        refused_within(
            60,
            &["train", "--config", cfg_s, "--set", set],
            tmp.path(),
            &[key, "f32"],
        );
    }
}

/// A reader that goes away (`refdpo stats … | head`) ends refdpo quietly with 128 + SIGPIPE, as
/// `cat`; it used to panic ("failed printing to stdout").
#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let (tmp, _cfg) = crate::common::precomputed("max_steps = 2");
    let cache = tmp.path().join("cache");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_refdpo"))
        .args(["stats", "--cache", cache.to_str().unwrap()])
        .current_dir(tmp.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader closes before refdpo writes
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// stderr on a full device (`2>/dev/full`): the command runs and exits as it would, its messages
/// dropped; `eprintln!` used to panic there, so every command exited 101 before doing any work.
#[test]
fn a_full_stderr_drops_messages_not_the_command() {
    let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
        eprintln!("skipped: no /dev/full on this machine");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let status = |args: &[&str], err: std::fs::File| {
        Command::new(env!("CARGO_BIN_EXE_refdpo"))
            .args(args)
            .current_dir(tmp.path())
            .stdout(Stdio::null())
            .stderr(err)
            .status()
            .unwrap()
            .code()
    };
    // an error (exit 1) and a run that writes a line on stderr ("refdpo precompute on cpu…")
    let missing = status(
        &["stats", "--cache", "no-such-cache"],
        full.try_clone().unwrap(),
    );
    assert_eq!(missing, Some(1));
    let cfg = demo_config(tmp.path(), "");
    assert_eq!(
        status(&["precompute", "--config", cfg.to_str().unwrap()], full),
        Some(0)
    );
    assert!(tmp.path().join("cache/train_prefs.arrow").exists());
}

#[test]
fn files_that_are_not_files_are_refused_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo_config(tmp.path(), "max_steps = 2");
    let cfg_s = cfg.to_str().unwrap();
    ok(&["precompute", "--config", cfg_s, "--quiet"], tmp.path());
    // the model's weights as /dev/zero (its length reads 0) and as a named pipe (a read blocks)
    let model = model_copy(tmp.path(), "model", |_| {});
    let weights = model.join("model.safetensors");
    let at = format!("model.id={}", model.display());
    let precompute = ["precompute", "--config", cfg_s, "--overwrite", "--set", &at];
    std::fs::remove_file(&weights).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &weights).unwrap();
    refused_within(
        60,
        &precompute,
        tmp.path(),
        &["model.safetensors", "not a regular file"],
    );
    std::fs::remove_file(&weights).unwrap();
    let fifo = Command::new("mkfifo").arg(&weights).status().unwrap();
    assert!(fifo.success());
    refused_within(
        60,
        &precompute,
        tmp.path(),
        &["model.safetensors", "not a regular file"],
    );
    // the dataset as a named pipe: said so, not "no such directory or hub id"
    let data = format!("dataset.id={}", weights.display());
    refused_within(
        60,
        &["precompute", "--config", cfg_s, "--set", &data],
        tmp.path(),
        &[
            "model.safetensors",
            "neither a directory nor a regular file",
        ],
    );
    // the pipeline file and the tokenizer's files as devices: no endless read
    refused_within(
        60,
        &["precompute", "--config", "/dev/zero"],
        tmp.path(),
        &["/dev/zero"],
    );
    // a cache file as a named pipe
    let arrow = tmp.path().join("cache/train_prefs.arrow");
    std::fs::remove_file(&arrow).unwrap();
    assert!(Command::new("mkfifo")
        .arg(&arrow)
        .status()
        .unwrap()
        .success());
    refused_within(
        60,
        &["train", "--config", cfg_s],
        tmp.path(),
        &["train_prefs.arrow", "not a regular file"],
    );
}

#[test]
fn outputs_never_land_on_inputs_or_through_links() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo_config(tmp.path(), "max_steps = 2");
    let cfg_s = cfg.to_str().unwrap();
    ok(&["precompute", "--config", cfg_s, "--quiet"], tmp.path());
    let arrow = tmp.path().join("cache/test_prefs.arrow");
    let before = std::fs::read(&arrow).unwrap();
    // `generate --out` onto the cache it reads
    refused_within(
        120,
        &[
            "generate",
            "--config",
            cfg_s,
            "--limit",
            "2",
            "--max-new-tokens",
            "2",
            "--out",
            arrow.to_str().unwrap(),
        ],
        tmp.path(),
        &["--out", ".jsonl"],
    );
    assert!(
        std::fs::read(&arrow).unwrap() == before,
        "the cache was written over"
    );
    // ... or onto a file of other lines named *.jsonl (a dataset, a run's metrics)
    let data = tmp.path().join("pairs.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"p\", \"chosen\": \"c\", \"rejected\": \"r\"}\n",
    )
    .unwrap();
    let kept = std::fs::read(&data).unwrap();
    refused_within(
        120,
        &[
            "generate",
            "--config",
            cfg_s,
            "--limit",
            "2",
            "--out",
            data.to_str().unwrap(),
        ],
        tmp.path(),
        &["--out", "other lines"],
    );
    assert!(
        std::fs::read(&data).unwrap() == kept,
        "the dataset was written over"
    );
    // its own earlier output is replaced, as a rerun expects
    let own = tmp.path().join("gen.jsonl");
    for _ in 0..2 {
        ok(
            &[
                "generate",
                "--config",
                cfg_s,
                "--quiet",
                "--limit",
                "2",
                "--max-new-tokens",
                "2",
                "--out",
                own.to_str().unwrap(),
            ],
            tmp.path(),
        );
    }
    // a run into the cache's directory
    let into_cache = format!("train.out={}/cache/", tmp.path().display());
    refused_within(
        60,
        &["train", "--config", cfg_s, "--set", &into_cache],
        tmp.path(),
        &["train.out", "precompute.out"],
    );
    // a lock file that is a symlink: refused, and its target left as it was
    let victim = tmp.path().join("victim.txt");
    std::fs::write(&victim, "keep me").unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::os::unix::fs::symlink(&victim, run.join(".refdpo-train.lock")).unwrap();
    refused_within(
        60,
        &["train", "--config", cfg_s],
        tmp.path(),
        &[".refdpo-train.lock", "symbolic link"],
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
    // a held-out split of every row
    let all_rows = "dataset.test_size=1000000";
    refused_within(
        60,
        &[
            "precompute",
            "--config",
            cfg_s,
            "--overwrite",
            "--set",
            all_rows,
        ],
        tmp.path(),
        &["dataset.test_size", "none is left"],
    );
}

/// A tokenizer whose regex backtracks without end on some text (onig gives up and panics): that
/// row is a counted skip with the tokenizer's message, every other row is kept, and `show`
/// explains the row rather than panicking.
#[test]
fn a_catastrophic_tokenizer_regex_is_a_skip_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo_config(tmp.path(), "");
    let cfg_s = cfg.to_str().unwrap();
    ok(&["precompute", "--config", cfg_s, "--quiet"], tmp.path());
    let model = model_copy(tmp.path(), "model", |_| {});
    let tok = model.join("tokenizer.json");
    let mut t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tok).unwrap()).unwrap();
    t["pre_tokenizer"] = serde_json::json!({"type": "Split", "pattern": {"Regex": "(a+)+$"},
        "behavior": "Isolated", "invert": false});
    std::fs::write(&tok, t.to_string()).unwrap();
    let turn = |role: &str, text: &str| serde_json::json!([{"role": role, "content": text}]);
    let row = |prompt: &str| {
        serde_json::json!({"prompt": turn("user", prompt), "chosen": turn("assistant", "yes they are"),
            "rejected": turn("assistant", "no")})
        .to_string()
    };
    let hostile = format!("cats {}!", "a".repeat(40));
    let lines = [row("cats are good"), row(&hostile), row("dogs are good")];
    let data = tmp.path().join("d.jsonl");
    std::fs::write(&data, lines.join("\n")).unwrap();
    let sets = [
        format!("model.id={}", model.display()),
        format!("dataset.id={}", data.display()),
        format!("precompute.out={}", tmp.path().join("c").display()),
        "demo.generate=false".to_string(),
    ];
    let mut args = vec!["precompute", "--config", cfg_s, "--quiet"];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    ok(&args, tmp.path());
    let report = crate::common::read_json(&tmp.path().join("c/report.json"));
    assert_eq!(report["train_prefs"]["rows_kept"], 2, "{report}");
    assert_eq!(
        report["train_prefs"]["dropped"]["template_error"], 1,
        "{report}"
    );
    let mut show = vec!["show", "--config", cfg_s, "--index", "1"];
    for s in &sets {
        show.extend(["--set", s.as_str()]);
    }
    let out = refdpo(&show, tmp.path());
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !text.contains("panicked") && out.status.code().is_some(),
        "{text}"
    );
}

/// config.json saying `tie_word_embeddings: true` over weights that store their own
/// `lm_head.weight`: transformers 5.24 loads the stored head (it ties only a head the files lack;
/// checked with `from_pretrained` on such a folder), so refdpo scores with it too, the same
/// log-probs as the untied original, and trains and saves it as a head of its own.
#[test]
fn a_stored_head_is_the_head_even_under_a_tie() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo_config(tmp.path(), "max_steps = 1");
    let cfg_s = cfg.to_str().unwrap();
    ok(&["precompute", "--config", cfg_s, "--quiet"], tmp.path());
    let model = model_copy(tmp.path(), "tied", |_| {});
    let path = model.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    c["tie_word_embeddings"] = true.into();
    std::fs::write(&path, c.to_string()).unwrap();
    let at = format!("model.id={}", model.display());
    let out = format!("precompute.out={}", tmp.path().join("tied-cache").display());
    ok(
        &[
            "precompute",
            "--config",
            cfg_s,
            "--quiet",
            "--set",
            &at,
            "--set",
            &out,
        ],
        tmp.path(),
    );
    let logps = |dir: &str| -> Vec<(f64, f64)> {
        let pq = refdpo::cache::parquet_path(&tmp.path().join(dir), "train_prefs");
        refdpo::cache::parquet::read(&pq)
            .unwrap()
            .iter()
            .map(|r| (r.ref_chosen_logps, r.ref_rejected_logps))
            .collect()
    };
    assert_eq!(logps("cache"), logps("tied-cache"));
    let run = format!("train.out={}", tmp.path().join("tied-run").display());
    let cache = format!("train.cache={}", tmp.path().join("tied-cache").display());
    ok(
        &[
            "train", "--config", cfg_s, "--quiet", "--set", &at, "--set", &cache, "--set", &run,
        ],
        tmp.path(),
    );
    let header =
        refdpo::model::weights::read_header(&tmp.path().join("tied-run/final/model.safetensors"))
            .unwrap();
    assert!(header.tensors.iter().any(|t| t.name == "lm_head.weight"));
}

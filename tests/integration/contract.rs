//! The contract, frozen: every command's `--help`, the demo cache's schema, fingerprint, report
//! keys and rows, and the demo run's `metrics.jsonl` (names in order; values within f32 noise,
//! timings aside) against fixtures in `tests/fixtures/contract/`, so a refactor that changes a
//! flag, a key, a column or a metric name fails here. `REFDPO_BLESS=1` rewrites the fixtures
//! (review the diff: it is a change of the contract).

use crate::common::{ok, read_json, repo};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures/contract").join(name)
}

fn bless() -> bool {
    std::env::var("REFDPO_BLESS").is_ok_and(|v| v == "1")
}

/// `got` against the fixture `name` (or written to it when blessing).
fn check_text(name: &str, got: &str) {
    let path = fixture(name);
    if bless() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (REFDPO_BLESS=1 writes it)", path.display()));
    assert_eq!(got, want, "{name} differs from {}", path.display());
}

/// Two JSON values equal in structure and strings; numbers within `tol` (relative, or absolute
/// near zero); keys named in `skip` (timings) only present.
fn close(got: &Value, want: &Value, tol: f64, skip: &[&str], at: &str) {
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => {
            let (gk, wk): (Vec<_>, Vec<_>) = (g.keys().collect(), w.keys().collect());
            assert_eq!(gk, wk, "{at}: keys");
            for (k, v) in g {
                if !skip.contains(&k.as_str()) {
                    close(v, &w[k], tol, skip, &format!("{at}.{k}"));
                }
            }
        }
        (Value::Array(g), Value::Array(w)) => {
            assert_eq!(g.len(), w.len(), "{at}: length");
            for (i, (a, b)) in g.iter().zip(w).enumerate() {
                close(a, b, tol, skip, &format!("{at}[{i}]"));
            }
        }
        (Value::Number(a), Value::Number(b)) => {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            assert!(
                (a - b).abs() <= tol * b.abs().max(1.0),
                "{at}: {a} against {b}"
            );
        }
        (a, b) => assert_eq!(a, b, "{at}"),
    }
}

fn check_json(name: &str, got: &Value, tol: f64, skip: &[&str]) {
    let path = fixture(name);
    if bless() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, serde_json::to_string_pretty(got).unwrap() + "\n").unwrap();
        return;
    }
    let want: Value = serde_json::from_str(
        &std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (REFDPO_BLESS=1 writes it)", path.display())),
    )
    .unwrap();
    close(got, &want, tol, skip, name);
}

#[test]
fn every_commands_help_is_the_contracts() {
    let tmp = tempfile::tempdir().unwrap();
    for cmd in [
        "",
        "precompute",
        "train",
        "stats",
        "show",
        "plot",
        "generate",
        "judge",
        "merge",
        "selftest",
    ] {
        let mut args: Vec<&str> = if cmd.is_empty() { vec![] } else { vec![cmd] };
        args.push("--help");
        let name = if cmd.is_empty() { "refdpo" } else { cmd };
        check_text(&format!("help-{name}.txt"), &ok(&args, tmp.path()));
    }
}

/// The demo pipeline with paths relative to `dir` (so the fingerprint holds no temporary path).
fn relative_demo(dir: &Path) -> PathBuf {
    let cfg = dir.join("pipeline.toml");
    std::fs::write(
        &cfg,
        r#"
[demo]
generate = true
dir = "demo"
train_rows = 96
test_rows = 32
[dataset]
id = "demo/dataset"
[model]
id = "demo/model"
dtype = "f32"
[tokenize]
max_length = 96
[precompute]
batch_size = 16
chunk_pairs = 32
out = "cache"
[train]
out = "run"
learning_rate = 2e-3
max_steps = 4
eval_every = 2
batch_size = 8
"#,
    )
    .unwrap();
    cfg
}

#[test]
fn the_demo_cache_and_metrics_are_the_contracts() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let cfg = relative_demo(t);
    let cfg_s = cfg.to_str().unwrap();
    ok(&["precompute", "--config", cfg_s, "--quiet"], t);
    ok(&["train", "--config", cfg_s, "--quiet"], t);

    let pq = t.join("cache/train_prefs.parquet");
    let fp = refdpo::cache::parquet::read_fingerprint(&pq).unwrap();
    let rows = refdpo::cache::parquet::read(&pq).unwrap();
    let schema = refdpo::cache::schema::schema();
    let cache = json!({
        "schema": schema.fields().iter().map(|f| format!("{}: {}", f.name(), f.data_type())).collect::<Vec<_>>(),
        "fingerprint": serde_json::to_value(&fp).unwrap(),
        "rows": rows.len(),
        "first_rows": rows.iter().take(6).map(|r| json!({
            "prompt_id": r.prompt_id, "row": r.row, "prompt_ids": r.prompt_ids,
            "chosen_ids": r.chosen_ids, "rejected_ids": r.rejected_ids,
            "ref_chosen_logps": r.ref_chosen_logps, "ref_rejected_logps": r.ref_rejected_logps,
            "score_chosen": r.score_chosen, "score_rejected": r.score_rejected,
            "chosen_truncated": r.chosen_truncated, "rejected_truncated": r.rejected_truncated,
        })).collect::<Vec<_>>(),
    });
    // the refdpo version is part of the fingerprint, but not of the contract; the log-probs'
    // last f32 digits follow the CPU's matmul kernels (AVX2 or AVX-512) and the batch layout
    // (their values are held to transformers' in fidelity.rs), hence 1e-7 relative
    check_json("demo-cache.json", &cache, 1e-7, &["refdpo_version"]);
    let timings = [
        "seconds",
        "tokens_per_second",
        "eval/tokens_per_second",
        "score_seconds",
        "step_seconds",
        "parquet",
        "arrow",
    ];
    check_json(
        "demo-report.json",
        &read_json(&t.join("cache/report.json")),
        0.0,
        &timings,
    );
    let metrics: Vec<Value> = std::fs::read_to_string(t.join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    check_json(
        "demo-metrics.json",
        &Value::Array(metrics.iter().map(without_coin_tosses).collect()),
        1e-5,
        &timings,
    );
}

/// A metrics record without `rewards/accuracies` where the policy still equals the reference
/// (every implicit reward within f32 noise, |r| < 1e-6): there it counts the signs of rounding
/// noise, which any change of a kernel's summation order flips (it is checked to be a fraction).
fn without_coin_tosses(record: &Value) -> Value {
    let mut record = record.clone();
    let reward = |k: &str| record.get(k).and_then(Value::as_f64);
    let noise = match (reward("rewards/chosen"), reward("rewards/rejected")) {
        (Some(c), Some(r)) => c.abs() < 1e-6 && r.abs() < 1e-6,
        _ => false,
    };
    if noise {
        let acc = record["rewards/accuracies"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "rewards/accuracies {acc}");
        record
            .as_object_mut()
            .unwrap()
            .insert("rewards/accuracies".into(), Value::from("f32 noise"));
    }
    record
}

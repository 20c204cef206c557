//! Users' own data through the CLI: one JSON Lines file as the dataset, bad lines counted as
//! skips with their line numbers, a seeded held-out split from `dataset.test_size`, and a file
//! without a test split (training then runs without evaluation).

use crate::common::{demo_config, ok, read_json, refdpo, train_with};
use serde_json::{json, Value};

/// 40 good pairs (standard and conversational mixed) and three bad lines, at known lines.
fn write_pairs(path: &std::path::Path) -> Vec<u64> {
    let mut lines = Vec::new();
    let mut bad = Vec::new();
    for i in 0..43 {
        let line = match i {
            7 => {
                bad.push(i + 1);
                "{not json".to_string()
            }
            19 => {
                bad.push(i + 1);
                json!({"prompt": "p", "chosen": " a"}).to_string() // no `rejected`
            }
            31 => {
                bad.push(i + 1);
                json!({"prompt": "p", "chosen": 3, "rejected": " b"}).to_string()
            }
            _ if i % 2 == 0 => json!({
                "prompt": format!("What is {i} plus {i}?"),
                "chosen": format!(" It is {}.", 2 * i),
                "rejected": format!(" It is {}.", 2 * i + 1),
            })
            .to_string(),
            _ => json!({
                "prompt": [{"role": "user", "content": format!("Name the number after {i}.")}],
                "chosen": [{"role": "assistant", "content": format!("{}", i + 1)}],
                "rejected": [{"role": "assistant", "content": format!("{}", i + 2)}],
            })
            .to_string(),
        };
        lines.push(line);
    }
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
    bad
}

fn split_entry(report: &Value, split: &str) -> Value {
    report[split].clone()
}

#[test]
fn a_jsonl_file_with_bad_lines_and_a_held_out_split() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo_config(tmp.path(), "max_steps = 2\neval_every = 1");
    let cfg_s = cfg.to_str().unwrap();
    let file = tmp.path().join("pairs.jsonl");
    let bad = write_pairs(&file);
    let id = format!("dataset.id={}", file.display());
    let precompute = |extra: &[&str]| {
        let mut args = vec!["precompute", "--config", cfg_s, "--quiet", "--set", &id];
        args.extend_from_slice(extra);
        ok(&args, tmp.path())
    };
    precompute(&["--set", "dataset.test_size=0.25"]);
    let report = read_json(&tmp.path().join("cache/report.json"));
    let (train, test) = (
        split_entry(&report, "train_prefs"),
        split_entry(&report, "test_prefs"),
    );
    // 43 rows: 11 held out (ceil(0.25 × 43)), 32 to train; 3 bad lines between them.
    assert_eq!(test["rows_read"], 11, "{report}");
    assert_eq!(train["rows_read"], 32, "{report}");
    let mut skipped: Vec<(u64, String)> = [&train, &test]
        .iter()
        .flat_map(|e| e["skipped_rows"].as_array().unwrap().clone())
        .map(|s| {
            (
                s["line"].as_u64().unwrap(),
                s["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    skipped.sort();
    assert_eq!(
        skipped,
        vec![
            (bad[0], "bad_json".to_string()),
            (bad[1], "missing_field".to_string()),
            (bad[2], "wrong_type".to_string()),
        ]
    );
    assert_eq!(
        train["rows_kept"].as_u64().unwrap() + test["rows_kept"].as_u64().unwrap(),
        40
    );
    // `refdpo show` reads the same file: a standard row, a conversational one, a bad line.
    let show = |index: &str| {
        ok(
            &["show", "--config", cfg_s, "--set", &id, "--index", index],
            tmp.path(),
        )
    };
    let out = show("2");
    assert!(
        out.contains("prompt text (standard layout") && out.contains("It is 4."),
        "{out}"
    );
    // the file has no prompt_id column: the prompt's SHA-256, as the cache stores it
    use sha2::Digest;
    let hash = format!("{:x}", sha2::Sha256::digest(b"What is 2 plus 2?"));
    assert!(
        out.starts_with(&format!("# train_prefs row 2 (prompt_id {hash})")),
        "{out}"
    );
    let out = show("3");
    assert!(
        out.contains("[user] Name the number after 3.") && out.contains("rendered prompt"),
        "{out}"
    );
    let out = show("7");
    assert!(
        out.contains("(line 8)") && out.contains("skipped: bad_json"),
        "{out}"
    );
    // The same rows are held out on a second run.
    std::fs::remove_dir_all(tmp.path().join("cache")).unwrap();
    precompute(&["--set", "dataset.test_size=0.25"]);
    let again = read_json(&tmp.path().join("cache/report.json"));
    assert_eq!(again["test_prefs"]["skipped_rows"], test["skipped_rows"]);
    assert_eq!(again["test_prefs"]["rows_kept"], test["rows_kept"]);
    // Training evaluates on the held-out rows.
    let out = train_with(cfg_s, tmp.path(), &[&id, "dataset.test_size=0.25"]);
    assert!(out.contains("eval loss"), "{out}");

    // Without test_size: no test split, said once; training runs without evaluation.
    std::fs::remove_dir_all(tmp.path().join("cache")).unwrap();
    let out = refdpo(
        &[
            "precompute",
            "--config",
            cfg_s,
            "--set",
            &id,
            "--set",
            "train.out=\"run2\"",
        ],
        tmp.path(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("no held-out evaluation") && err.contains("dataset.test_size"),
        "{err}"
    );
    let report = read_json(&tmp.path().join("cache/report.json"));
    assert!(report.get("test_prefs").is_none(), "{report}");
    let out = train_with(cfg_s, tmp.path(), &[&id, "train.out=\"run2\""]);
    assert!(
        out.contains("trained 2 steps") && !out.contains("eval loss"),
        "{out}"
    );
}

/// A file's first row that lacks a column is one counted skip, as any other row is; a mapping
/// that no row of the file's first ones matches is refused, naming what they hold. A data file
/// that does not exist is named as one, not looked up on the hub.
#[test]
fn a_bad_first_row_is_a_skip_and_a_wrong_mapping_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo_config(tmp.path(), "");
    let cfg_s = cfg.to_str().unwrap();
    let file = tmp.path().join("pairs.jsonl");
    let mut lines = vec![json!({"prompt": "p", "chosen": " y"}).to_string()];
    for i in 0..20 {
        lines.push(
            json!({"prompt": format!("Q{i}?"), "chosen": format!(" {i}"), "rejected": " no"})
                .to_string(),
        );
    }
    std::fs::write(&file, lines.join("\n")).unwrap();
    let id = format!("dataset.id={}", file.display());
    ok(
        &["precompute", "--config", cfg_s, "--quiet", "--set", &id],
        tmp.path(),
    );
    let report = read_json(&tmp.path().join("cache/report.json"));
    assert_eq!(
        report["train_prefs"]["dropped"]["missing_field"], 1,
        "{report}"
    );
    assert_eq!(report["train_prefs"]["rows_kept"], 20, "{report}");
    let run = |sets: &[&str]| {
        let mut args = vec!["precompute", "--config", cfg_s, "--quiet"];
        args.extend(["--set", "precompute.out=other"]);
        for s in sets {
            args.extend(["--set", s]);
        }
        let out = refdpo(&args, tmp.path());
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&[&id, "dataset.columns.rejected=worse"]);
    assert!(
        err.contains("column `worse` is missing")
            && err.contains("found: prompt, chosen, rejected"),
        "{err}"
    );
    let err = run(&["dataset.id=nope.jsonl"]);
    assert!(err.contains("no file `nope.jsonl`"), "{err}");
}

/// `dataset.test_size` on a source with its own test split replaces it with held-out train
/// rows: said, since a published test split is what evaluations are usually compared on.
#[test]
fn a_hold_out_that_replaces_the_sources_test_split_is_said() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo_config(tmp.path(), "");
    let out = refdpo(
        &[
            "precompute",
            "--config",
            cfg.to_str().unwrap(),
            "--quiet",
            "--set",
            "dataset.test_size=0.1",
        ],
        tmp.path(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("has its own `test_prefs` split"), "{err}");
}

/// ShareGPT rows mapped halfway: each missing key names the one to set.
#[test]
fn a_half_mapped_sharegpt_file_names_the_keys_to_set() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo_config(tmp.path(), "");
    let file = tmp.path().join("sharegpt.json");
    let rows: Vec<Value> = (0..5)
        .map(|i| {
            json!({
                "conversations": [{"from": "human", "value": format!("Q{i}?")}],
                "chosen": {"from": "gpt", "value": "yes"},
                "rejected": {"from": "gpt", "value": "no"},
            })
        })
        .collect();
    std::fs::write(&file, serde_json::to_string(&rows).unwrap()).unwrap();
    let id = format!("dataset.id={}", file.display());
    let run = |sets: &[&str]| {
        let mut args = vec!["precompute", "--config", cfg.to_str().unwrap(), "--quiet"];
        for s in [
            &["dataset.columns.prompt=conversations", id.as_str()][..],
            sets,
        ]
        .concat()
        {
            args.extend(["--set", s]);
        }
        let out = refdpo(&args, tmp.path());
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&[]);
    assert!(
        err.contains("null_value") && err.contains("dataset.message_keys"),
        "{err}"
    );
    let err = run(&[
        "dataset.message_keys.role=from",
        "dataset.message_keys.content=value",
    ]);
    assert!(
        err.contains("unknown_role") && err.contains("dataset.roles"),
        "{err}"
    );
}

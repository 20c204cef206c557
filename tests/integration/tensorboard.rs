//! `train.report_to = ["tensorboard"]`: TensorBoard's own reader (`EventAccumulator`, from the
//! `tensorboard` package) returns every scalar of `metrics.jsonl`, under its name and step, as
//! f32; after a resume from an earlier checkpoint, or one that makes the final evaluation again,
//! it returns each step once, the rewritten one.
//!
//! Needs `REFDPO_PYTHON` (`export REFDPO_PYTHON=$(bash tests/python/install.sh)`); `.ci/run`
//! installs it. Without it the test is ignored, except under `CI=true`.

use super::common::{demo_config, ok, train_with};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// Every (tag → [(step, value)]) TensorBoard's reader finds under `dir`.
fn read_events(dir: &Path) -> BTreeMap<String, Vec<(u64, f64)>> {
    let python = std::env::var("REFDPO_PYTHON").expect(
        "REFDPO_PYTHON is not set: this test needs TensorBoard's reader \
         (export REFDPO_PYTHON=$(bash tests/python/install.sh))",
    );
    let script = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator, SCALARS
acc = EventAccumulator(sys.argv[1], size_guidance={SCALARS: 0})
acc.Reload()
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}))
"#;
    let out = Command::new(python)
        .args(["-c", script])
        .arg(dir)
        .output()
        .expect("run TensorBoard's reader");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: BTreeMap<String, Vec<(u64, f64)>> = serde_json::from_slice(&out.stdout).unwrap();
    v
}

/// metrics.jsonl as TensorBoard should hold it: tag → [(step, f32 value)].
fn expected(run: &Path) -> BTreeMap<String, Vec<(u64, f64)>> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let mut want: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let step = v["step"].as_u64().unwrap();
        for (k, x) in v.as_object().unwrap() {
            if k != "step" {
                let x = f64::from(x.as_f64().unwrap() as f32);
                want.entry(k.clone()).or_default().push((step, x));
            }
        }
    }
    want
}

#[test]
#[cfg_attr(
    python_absent,
    ignore = "needs TensorBoard's reader: export REFDPO_PYTHON=$(bash tests/python/install.sh)"
)]
fn tensorboard_reads_back_every_logged_scalar_and_a_resume_rewrites_its_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let extra =
        "lr_schedule = \"constant\"\nsave_every = 3\neval_every = 2\nreport_to = [\"tensorboard\"]";
    let cfg = demo_config(tmp.path(), extra);
    let cfg_s = cfg.to_str().unwrap();
    ok(&["precompute", "--config", cfg_s, "--quiet"], tmp.path());
    let run = tmp.path().join("run");
    let steps = |n: &str| format!("train.max_steps={n}");
    train_with(cfg_s, tmp.path(), &[&steps("5"), "train.warmup_ratio=0"]);
    let (got, want) = (read_events(&run.join("runs")), expected(&run));
    assert!(
        want.contains_key("loss") && want.contains_key("eval/loss"),
        "{want:?}"
    );
    assert!(want.contains_key("rewards/margins") && want.contains_key("learning_rate"));
    assert_eq!(got, want, "TensorBoard's scalars differ from metrics.jsonl");

    // Back to checkpoint 3 (as after a kill during step 4 or 5): the resumed run rewrites steps
    // 4 and 5, and TensorBoard shows each once, as metrics.jsonl does.
    for stale in ["checkpoint-5", "final"] {
        let p = run.join(stale);
        if p.exists() {
            std::fs::remove_dir_all(&p).unwrap();
        }
    }
    train_with(
        cfg_s,
        tmp.path(),
        &["--resume", &steps("5"), "train.warmup_ratio=0"],
    );
    let files = std::fs::read_dir(run.join("runs")).unwrap().count();
    assert_eq!(files, 2, "the resumed run writes its own event file");
    let (got, want) = (read_events(&run.join("runs")), expected(&run));
    let loss_steps: Vec<u64> = got["loss"].iter().map(|(s, _)| *s).collect();
    assert_eq!(
        loss_steps,
        [1, 2, 3, 4, 5],
        "each step once after the resume"
    );
    assert_eq!(
        got, want,
        "TensorBoard's scalars differ from metrics.jsonl after the resume"
    );

    // Killed while `final/` was replaced, after the last step: the resumed run evaluates step 5
    // again, and TensorBoard keeps that evaluation once and step 5's training line.
    std::fs::rename(run.join("final"), run.join("final.old")).unwrap();
    train_with(
        cfg_s,
        tmp.path(),
        &["--resume", &steps("5"), "train.warmup_ratio=0"],
    );
    let (got, want) = (read_events(&run.join("runs")), expected(&run));
    let steps_of = |tag: &str| got[tag].iter().map(|(s, _)| *s).collect::<Vec<u64>>();
    assert_eq!(
        steps_of("eval/loss"),
        [2, 4, 5],
        "the final evaluation once"
    );
    assert_eq!(steps_of("loss"), [1, 2, 3, 4, 5]);
    assert_eq!(
        got, want,
        "TensorBoard's scalars differ from metrics.jsonl after the final evaluation's resume"
    );
}

//! Interrupts: Ctrl-C and SIGTERM stop `train` after its step with a checkpoint and `precompute`
//! at its next batch with the finished chunks kept; either resumes to an uninterrupted run's bytes.
//! A second writer into the same directory is refused while the first runs.

use super::common::{
    cache_files, demo_config, fails, ok, precomputed, read_json, train_with, wait_for_lines,
    wait_until,
};
use std::path::Path;
use std::process::{Child, Command, Stdio};

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Sends `signal` (`-INT`, `-TERM`) to `child`.
fn signal(child: &Child, signal: &str) {
    let sent = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

#[test]
fn one_writer_at_a_time_and_ctrl_c_checkpoints_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = "lr_schedule = \"constant\"\nmax_steps = 5000";
    let cfg = demo_config(tmp.path(), extra);
    let cfg_s = cfg.to_str().unwrap();
    let out = tmp.path().join("cache");

    // A second precompute into a cache directory in use is refused at once, naming the holder.
    let held = refdpo::outputs::DirLock::acquire(&out, "precompute").unwrap();
    let err = fails(&["precompute", "--config", cfg_s], tmp.path());
    assert!(
        err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    drop(held);
    ok(&["precompute", "--config", cfg_s, "--quiet"], tmp.path());

    let run = tmp.path().join("run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_refdpo"))
        .args(["train", "--config", cfg_s, "--quiet"])
        .args(["--set", "train.warmup_ratio=0"])
        .current_dir(tmp.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    wait_for_lines(&mut child, &run.join("metrics.jsonl"), 3);
    // A second train into the same run is refused, naming the running one's pid.
    let err = fails(&["train", "--config", cfg_s, "--resume"], tmp.path());
    assert!(err.contains(&format!("pid {pid}")), "{err}");
    // `generate --run` says the run is still training (not "finish it with --resume").
    let run_s = run.to_str().unwrap();
    let err = fails(
        &[
            "generate", "--config", cfg_s, "--run", run_s, "--limit", "1",
        ],
        tmp.path(),
    );
    assert!(
        err.contains(&format!("`refdpo train` (pid {pid}) is training it")),
        "{err}"
    );

    // Ctrl-C: the step finishes, a checkpoint is written, the exit is non-zero.
    signal(&child, "-INT");
    let result = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success(), "{stderr}");
    assert!(
        stderr.contains("interrupted: stopped after step"),
        "{stderr}"
    );
    let (ckpt, state) = refdpo::train::checkpoint::latest(&run)
        .unwrap()
        .expect("a checkpoint");
    let k = state.global_step;
    assert!(stderr.contains(&ckpt.display().to_string()), "{stderr}");
    assert!((3..5000).contains(&k), "stopped at step {k}");
    // The lock file still names the process that is gone: the next run takes it over.
    let lock = std::fs::read_to_string(run.join(".refdpo-train.lock")).unwrap();
    assert_eq!(lock.trim(), pid.to_string());

    let total = format!("train.max_steps={}", k + 3);
    let no_warmup = "train.warmup_ratio=0";
    train_with(cfg_s, tmp.path(), &["--resume", &total, no_warmup]);
    let clean = tmp.path().join("clean");
    let clean_out = format!("train.out={}", clean.display());
    train_with(cfg_s, tmp.path(), &[&total, &clean_out, no_warmup]);
    assert!(
        bytes(&run.join("final/model.safetensors"))
            == bytes(&clean.join("final/model.safetensors")),
        "interrupted + resumed run ends with other weights than an uninterrupted one"
    );

    // Resuming the finished run does nothing, and says so.
    let metrics = bytes(&run.join("metrics.jsonl"));
    let said = train_with(cfg_s, tmp.path(), &["--resume", &total, no_warmup]);
    assert!(said.contains("nothing to resume"), "{said}");
    assert!(
        bytes(&run.join("metrics.jsonl")) == metrics,
        "metrics.jsonl changed"
    );
    // Without `final/` (train.save_final = false), a resume from the last checkpoint makes the
    // final evaluation again, in place of the logged one: one evaluation line at the last step.
    let last = format!("train.save_every={}", k + 3);
    let no_final = "train.save_final=false";
    let fresh = ["--overwrite", &total, no_warmup, &last, no_final];
    train_with(cfg_s, tmp.path(), &fresh);
    let evals_at_end = || {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("eval/loss"))
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["step"].as_u64() == Some(k as u64 + 3))
            .count()
    };
    assert_eq!(evals_at_end(), 1);
    let said = train_with(
        cfg_s,
        tmp.path(),
        &["--resume", &total, no_warmup, &last, no_final],
    );
    assert!(said.contains("no step left to train"), "{said}");
    assert!(!said.contains("NaN"), "{said}");
    assert_eq!(evals_at_end(), 1);
}

/// One stop request delivered twice at once (coreutils `timeout` signals the process and then its
/// group) is still a clean stop: the step ends, a checkpoint is written, the error says where.
#[test]
fn a_signal_delivered_twice_at_once_is_one_clean_stop() {
    let (tmp, cfg) = precomputed("lr_schedule = \"constant\"\nmax_steps = 5000");
    let cfg_s = cfg.to_str().unwrap();
    let run = tmp.path().join("run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_refdpo"))
        .args(["train", "--config", cfg_s, "--quiet"])
        .current_dir(tmp.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_lines(&mut child, &run.join("metrics.jsonl"), 3);
    for _ in 0..2 {
        signal(&child, "-TERM");
    }
    let result = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("interrupted: stopped after step"),
        "{stderr}"
    );
    assert!(refdpo::train::checkpoint::latest(&run).unwrap().is_some());
}

/// Ctrl-C while stage one scores: it stops at the next batch, keeps the finished chunks and says
/// so; the rerun scores only the rest and ends with an uninterrupted run's bytes.
#[test]
fn ctrl_c_in_precompute_keeps_the_finished_chunks_and_the_rerun_matches() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo_config(tmp.path(), "");
    let cfg_s = cfg.to_str().unwrap();
    let small = [
        "--set",
        "demo.train_rows=3000",
        "--set",
        "precompute.chunk_pairs=16",
        "--set",
        "precompute.batch_size=4",
    ];
    let args = |out: &Path| -> Vec<String> {
        let mut a: Vec<String> = ["precompute", "--config", cfg_s, "--quiet"]
            .iter()
            .chain(&small)
            .map(|s| s.to_string())
            .collect();
        a.extend(["--set".into(), format!("precompute.out={}", out.display())]);
        a
    };
    let (clean, out) = (tmp.path().join("clean"), tmp.path().join("cache"));
    let clean_args = args(&clean);
    ok(
        &clean_args.iter().map(String::as_str).collect::<Vec<_>>(),
        tmp.path(),
    );

    let partial = out.join(".partial-train_prefs");
    let mut child = Command::new(env!("CARGO_BIN_EXE_refdpo"))
        .args(args(&out))
        .current_dir(tmp.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(&mut child, "two finished chunks", || {
        partial.join("chunk-00001.arrow").exists()
    });
    signal(&child, "-INT");
    let result = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("interrupted: stopped while scoring chunk")
            && stderr.contains("run the same `refdpo precompute`"),
        "{stderr}"
    );
    assert!(!out.join("train_prefs.arrow").exists());
    let kept = std::fs::read_dir(&partial)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension() == Some("arrow".as_ref()))
        .count();
    assert!(kept >= 2, "{kept} chunks kept");
    assert!(
        stderr.contains(&format!("the {kept} finished before it")),
        "{stderr}"
    );

    let rerun = args(&out);
    ok(
        &rerun.iter().map(String::as_str).collect::<Vec<_>>(),
        tmp.path(),
    );
    let report = read_json(&out.join("report.json"));
    assert_eq!(report["train_prefs"]["resumed_chunks"], kept);
    for (a, b) in cache_files(&clean).iter().zip(cache_files(&out)) {
        assert!(bytes(a) == bytes(&b), "{} differs", b.display());
    }
}

//! Shared helpers: paths, the refdpo binary, temporary pipelines.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `../shared/realdata`. Tests that call this carry
/// `#[cfg_attr(realdata_absent, ignore = "needs ../shared/realdata")]` (build.rs sets the cfg where
/// it is absent outside CI), so reaching here without it means CI=true: fail and name it.
pub fn realdata() -> PathBuf {
    let p = repo().join("../shared/realdata");
    assert!(
        p.is_dir(),
        "{} is absent: this test needs the real-data sample (under CI=true it is required, not skipped)",
        p.display()
    );
    p
}

pub fn refdpo(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_refdpo"))
        .args(args)
        .current_dir(cwd)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run refdpo")
}

/// refdpo under the shell's `ulimit LIMIT` (e.g. `-d 12288`).
pub fn refdpo_under(limit: &str, args: &[&str], cwd: &Path) -> Output {
    Command::new("bash")
        .arg("-c")
        .arg(format!("ulimit {limit} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_refdpo"))
        .args(args)
        .current_dir(cwd)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

/// Runs refdpo and asserts success, returning stdout.
pub fn ok(args: &[&str], cwd: &Path) -> String {
    let out = refdpo(args, cwd);
    assert!(
        out.status.success(),
        "refdpo {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `refdpo train --config CFG --quiet`, each of `sets` as `--set KEY=VALUE` (a flag such as
/// `--resume` passes as is), asserting success; returns stdout.
pub fn train_with(cfg: &str, cwd: &Path, sets: &[&str]) -> String {
    let mut args = vec!["train", "--config", cfg, "--quiet"];
    for s in sets {
        if !s.starts_with("--") {
            args.push("--set");
        }
        args.push(s);
    }
    ok(&args, cwd)
}

/// Runs refdpo expecting failure; returns stderr.
pub fn fails(args: &[&str], cwd: &Path) -> String {
    let out = refdpo(args, cwd);
    assert!(
        !out.status.success(),
        "refdpo {args:?} unexpectedly succeeded"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A small demo pipeline rooted in `dir` (its own demo assets, cache and run directories).
pub fn demo_config(dir: &Path, extra: &str) -> PathBuf {
    let d = dir.display();
    let text = format!(
        r#"
[demo]
generate = true
dir = "{d}/demo"
train_rows = 160
test_rows = 64

[dataset]
id = "{d}/demo/dataset"

[model]
id = "{d}/demo/model"
dtype = "f32"

[tokenize]
max_length = 96

[precompute]
batch_size = 16
chunk_pairs = 32
out = "{d}/cache"

[train]
out = "{d}/run"
learning_rate = 2e-3
warmup_ratio = 0.1
epochs = 1
batch_size = 16
{extra}
"#
    );
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A demo pipeline in a temporary directory of its own, stage one done: (the directory, the
/// pipeline file).
pub fn precomputed(extra: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo_config(tmp.path(), extra);
    ok(
        &["precompute", "--config", cfg.to_str().unwrap(), "--quiet"],
        tmp.path(),
    );
    (tmp, cfg)
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// max |t| over all elements (f32 tensors).
pub fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// max |a − b| over all elements (f32 tensors).
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// The four files of a demo cache (both splits, Parquet and Arrow).
pub fn cache_files(out: &Path) -> Vec<PathBuf> {
    ["train_prefs", "test_prefs"]
        .iter()
        .flat_map(|s| {
            [
                refdpo::cache::parquet_path(out, s),
                refdpo::cache::arrow_path(out, s),
            ]
        })
        .collect()
}

/// Rewrites an Arrow cache file with `edit` applied to its rows; the file stays valid (same
/// fingerprint, a fresh checksum), so only the edited values are wrong.
pub fn rewrite_cache(arrow: &Path, edit: impl FnOnce(&mut Vec<refdpo::cache::CacheRow>)) {
    let mapped = refdpo::cache::MappedCache::open(arrow).unwrap();
    let fp = mapped.fingerprint.clone();
    let mut rows: Vec<_> = (0..mapped.len()).map(|i| mapped.to_row(i)).collect();
    drop(mapped);
    edit(&mut rows);
    refdpo::cache::ipc::write(arrow, &rows, &fp).unwrap();
}

/// A copy of the folder `src` (recursively) at `dst`.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let to = dst.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &to);
        } else {
            std::fs::copy(&p, &to).unwrap();
        }
    }
}

/// Waits until `ready()`, while `child` runs.
pub fn wait_until(child: &mut Child, what: &str, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !ready() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until `path` holds at least `lines` lines, while `child` runs.
pub fn wait_for_lines(child: &mut Child, path: &Path, lines: usize) {
    let count = || std::fs::read_to_string(path).map_or(0, |t| t.lines().count());
    wait_until(child, &path.display().to_string(), || count() >= lines);
}

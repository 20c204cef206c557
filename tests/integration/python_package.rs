//! The `refdpo` Python package (`python/refdpo`), pytest in `python/tests/`:
//! - `load_cache` and `read_fingerprint` on caches this binary writes, against pyarrow's own
//!   reading of the Parquet files beside them; shards; damaged and missing files refused by name;
//! - `refdpo.trl.CachedReferenceDPOTrainer` against TRL's own precompute on real UltraFeedback
//!   rows (batches, first loss, rewards, every gradient; no reference forward), a two-process
//!   accelerate run over a sharded cache against one process, mismatched caches refused by name.
//!   These need `../shared/realdata`: skipped (and counted) without it, failed under `CI=true`.
//!
//! Needs `REFDPO_PYTHON` (`export REFDPO_PYTHON=$(bash tests/python/install.sh)`); `.ci/run`
//! installs it. Without it the test is ignored, except under `CI=true`.

use super::common::repo;
use std::process::Command;

#[test]
#[cfg_attr(
    python_absent,
    ignore = "needs pyarrow and datasets: export REFDPO_PYTHON=$(bash tests/python/install.sh)"
)]
fn the_python_package_reads_the_cache_and_trains_trl_from_it() {
    let python = std::env::var("REFDPO_PYTHON").expect(
        "REFDPO_PYTHON is not set: the Python package's tests need pyarrow and datasets \
         (export REFDPO_PYTHON=$(bash tests/python/install.sh))",
    );
    let out = Command::new(python)
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "python/tests",
        ])
        .current_dir(repo())
        .env("PYTHONPATH", repo().join("python"))
        .env("REFDPO_BIN", env!("CARGO_BIN_EXE_refdpo"))
        .output()
        .expect("run pytest");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let want = if repo().join("../shared/realdata").is_dir() {
        "13 passed"
    } else {
        eprintln!("the TRL tests were skipped: ../shared/realdata is absent");
        "9 passed, 4 skipped"
    };
    assert!(text.contains(want), "{text}");
}

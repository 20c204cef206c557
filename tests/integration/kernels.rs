//! The GPU kernels' own source, checked on the CPU. The Triton kernels (`src/model/fused/triton/`):
//! Triton's interpreter runs them against the composed ops (forward and every input's gradient),
//! and `compile.py --check` recompiles them for sm_80 and sm_90, with no GPU, and compares the
//! committed cubins and manifest byte for byte. The CUDA C kernels (`src/model/fused/kernels.cu`):
//! built for the CPU by the host's C++ compiler (`src/model/fused/emulator/`), each block's threads
//! as OS threads, against torch, and again under ThreadSanitizer for shared-memory races.
//!
//! Needs `REFDPO_PYTHON` (a python with torch and triton: `export
//! REFDPO_PYTHON=$(bash tests/python/install.sh)`); `.ci/run` installs it. Without it the
//! tests are ignored, except under `CI=true`.

use super::common::repo;
use std::process::Command;

fn python() -> String {
    std::env::var("REFDPO_PYTHON").expect(
        "REFDPO_PYTHON is not set: the Triton checks need torch and triton \
         (export REFDPO_PYTHON=$(bash tests/python/install.sh))",
    )
}

fn run(args: &[&str], interpret: bool) -> String {
    run_in("src/model/fused/triton", args, interpret)
}

fn run_in(folder: &str, args: &[&str], interpret: bool) -> String {
    let dir = repo().join(folder);
    let mut cmd = Command::new(python());
    cmd.args(args)
        .current_dir(&dir)
        .env_remove("TRITON_INTERPRET");
    if interpret {
        cmd.env("TRITON_INTERPRET", "1");
    }
    let out = cmd.output().expect("run the kernel python");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{args:?} failed:\n{text}");
    text
}

/// The pytest summary line of `text`, checked: nothing failed or skipped, at least `least` passed.
fn all_passed(text: &str, least: usize) {
    let summary = text
        .lines()
        .rev()
        .find(|l| l.contains(" passed"))
        .unwrap_or_else(|| panic!("no pytest summary:\n{text}"));
    assert!(
        !summary.contains("failed") && !summary.contains("skipped"),
        "{summary}"
    );
    let passed: usize = summary
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(passed >= least, "expected every case to run: {summary}");
}

#[test]
#[cfg_attr(
    python_absent,
    ignore = "needs torch and triton: export REFDPO_PYTHON=$(bash tests/python/install.sh)"
)]
fn the_tiled_attention_source_equals_the_composed_ops_in_the_interpreter() {
    let text = run(&["-m", "pytest", "-q", "-p", "no:cacheprovider", "."], true);
    all_passed(&text, 42);
}

#[test]
#[cfg_attr(
    python_absent,
    ignore = "needs torch: export REFDPO_PYTHON=$(bash tests/python/install.sh)"
)]
fn the_cuda_kernels_source_equals_torch_on_the_cpu_without_races() {
    let args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "."];
    let text = run_in("src/model/fused/emulator", &args, false);
    all_passed(&text, 108);
}

#[test]
#[cfg_attr(
    python_absent,
    ignore = "needs torch and triton: export REFDPO_PYTHON=$(bash tests/python/install.sh)"
)]
fn the_committed_cubins_are_what_the_source_compiles_to() {
    let text = run(&["compile.py", "--check"], false);
    assert!(text.contains("kernels up to date"), "{text}");
}

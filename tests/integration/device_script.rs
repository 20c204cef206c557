//! The device call's selftest ladder (`bench/device_lib.sh`, which `bench/device.sh` sources),
//! with a stand-in refdpo whose failing report is the real one's text: the kernels a selftest
//! names are left out for the second check and the benchmarks; when none is named, every
//! sequence whole (`REFDPO_SHARE_PROMPTS=0`); when that fails too, the composed ops
//! (`REFDPO_FUSED=0`). A selftest cut off at its time limit is no failing kernel: no rung runs.

use super::common::repo;
use refdpo::model::fused::Kernel;
use refdpo::selftest::{report, Check};
use std::process::Command;

/// The ladder's outcome: (its return code and what it exported, the last `ops:` line of
/// $OUT/stages.txt, $OUT/stages.txt), with the first selftest ending in `first_exit`.
fn ladder_ending(
    first_report: &str,
    first_exit: i32,
    second_passes: bool,
) -> (String, String, String) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(tmp.path().join("first.txt"), first_report).unwrap();
    // the stand-in: fails with the report under the fused ops, passes under REFDPO_FUSED=0,
    // and under any other setting (kernels left out, or every sequence whole) as told
    let stub = tmp.path().join("refdpo");
    std::fs::write(
        &stub,
        format!(
            "#!/usr/bin/env bash\n\
             case \"${{REFDPO_FUSED-}}/${{REFDPO_SHARE_PROMPTS-}}\" in\n\
             /) cat '{}'; exit {} ;;\n\
             0/) echo 'selftest on cuda:0: 9 passed, 0 failed' ;;\n\
             *) echo \"selftest with $REFDPO_FUSED\"; exit {} ;;\n\
             esac\n",
            tmp.path().join("first.txt").display(),
            first_exit,
            if second_passes { 0 } else { 1 }
        ),
    )
    .unwrap();
    let script = format!(
        "set -uo pipefail; unset REFDPO_FUSED REFDPO_SHARE_PROMPTS; OUT='{}' REFDPO='bash {}' \
         DEVICE=cuda; source bench/device_lib.sh; selftest_ladder; \
         echo \"rc=$? share=${{REFDPO_SHARE_PROMPTS-unset}} fused=${{REFDPO_FUSED-unset}}\"",
        out.display(),
        stub.display()
    );
    let run = Command::new("bash")
        .args(["-c", &script])
        .current_dir(repo())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    let last = stdout.lines().last().unwrap_or_default().to_string();
    // the device tool returns 8 files at most: the ladder writes two, whatever it runs
    let files: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");
    let stages = std::fs::read_to_string(out.join("stages.txt")).unwrap_or_default();
    let ops = stages
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("ops: "))
        .unwrap_or_default()
        .to_string();
    (last, ops, stages)
}

/// [`ladder_ending`] with a failing first selftest, the ladder passing in the end.
fn ladder(first_report: &str, second_passes: bool) -> (String, String, String) {
    let (last, ops, stages) = ladder_ending(first_report, 1, second_passes);
    assert!(last.starts_with("rc=0 "), "{last}");
    (last, ops, stages)
}

fn failing(kernel: Option<Kernel>) -> String {
    let checks = [
        Check {
            name: "fused rope forward bf16".into(),
            error: 0.5,
            tolerance: 3e-2,
            kernel: Some(Kernel::Rope),
            note: None,
        },
        Check {
            name: "llama reference log-probs bf16".into(),
            error: 0.4,
            tolerance: 3e-2,
            kernel,
            note: None,
        },
    ];
    let (text, passed) = report("cuda:0", &checks[if kernel.is_some() { 0 } else { 1 }..]);
    assert!(!passed);
    text
}

#[test]
fn the_device_script_leaves_out_the_kernels_the_selftest_names() {
    // rope's own check and a model check blamed on adamw8: both left out, and that passes
    let (last, ops, stages) = ladder(&failing(Some(Kernel::Adamw8)), true);
    assert!(last.ends_with("fused=-rope,-adamw8"), "{last}");
    assert_eq!(ops, "REFDPO_FUSED=-rope,-adamw8");
    assert!(stages.contains("== selftest-without: exit 0"), "{stages}");
    assert!(!stages.contains("selftest-composed"), "{stages}");
    // still failing without them: the composed ops
    let (last, ops, stages) = ladder(&failing(Some(Kernel::Adamw8)), false);
    assert!(last.ends_with("fused=0"), "{last}");
    assert_eq!(ops, "REFDPO_FUSED=0");
    assert!(stages.contains("== selftest-composed: exit 0"), "{stages}");
    // no kernel named: every sequence whole, and that passes
    let (last, ops, stages) = ladder(&failing(None), true);
    assert!(last.ends_with("share=0 fused=unset"), "{last}");
    assert_eq!(ops, "REFDPO_SHARE_PROMPTS=0");
    assert!(stages.contains("== selftest-whole: exit 0"), "{stages}");
    assert!(!stages.contains("selftest-without"), "{stages}");
    // still failing: the composed ops, prompts shared again
    let (last, ops, stages) = ladder(&failing(None), false);
    assert!(last.ends_with("share=unset fused=0"), "{last}");
    assert_eq!(ops, "REFDPO_FUSED=0");
    assert!(stages.contains("== selftest-whole: exit 1"), "{stages}");
}

#[test]
fn a_selftest_cut_off_at_its_limit_runs_no_rung() {
    let (last, ops, stages) = ladder_ending("still checking", 124, true);
    assert!(
        last.starts_with("rc=2 ") && last.ends_with("share=unset fused=unset"),
        "{last}"
    );
    assert!(ops.starts_with("fused (the selftest was cut off"), "{ops}");
    assert!(!stages.contains("selftest-"), "{stages}");
}

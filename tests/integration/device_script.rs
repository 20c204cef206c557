//! The device call's selftest ladder (`bench/device_lib.sh`, which `bench/device.sh` sources),
//! with a stand-in refdpo whose failing report is the real one's text: the kernels a selftest
//! names are left out for the second check and the benchmarks; when none is named, every
//! sequence whole (`REFDPO_SHARE_PROMPTS=0`); when that fails too, the composed ops
//! (`REFDPO_FUSED=0`).

use super::common::repo;
use refdpo::model::fused::Kernel;
use refdpo::selftest::{report, Check};
use std::process::Command;

/// The ladder's outcome: (REFDPO_FUSED it exported, $OUT/ops.txt, the stages that ran).
fn ladder(first_report: &str, second_passes: bool) -> (String, String, String) {
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
             /) cat '{}'; exit 1 ;;\n\
             0/) echo 'selftest on cuda:0: 9 passed, 0 failed' ;;\n\
             *) echo \"selftest with $REFDPO_FUSED\"; exit {} ;;\n\
             esac\n",
            tmp.path().join("first.txt").display(),
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
    assert!(last.starts_with("rc=0 "), "{stdout}");
    let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap_or_default();
    (last, read("ops.txt"), read("stages.txt"))
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
    assert_eq!(ops.trim(), "REFDPO_FUSED=-rope,-adamw8");
    assert!(stages.contains("== selftest-without: exit 0"), "{stages}");
    assert!(!stages.contains("selftest-composed"), "{stages}");
    // still failing without them: the composed ops
    let (last, ops, stages) = ladder(&failing(Some(Kernel::Adamw8)), false);
    assert!(last.ends_with("fused=0"), "{last}");
    assert_eq!(ops.trim(), "REFDPO_FUSED=0");
    assert!(stages.contains("== selftest-composed: exit 0"), "{stages}");
    // no kernel named: every sequence whole, and that passes
    let (last, ops, stages) = ladder(&failing(None), true);
    assert!(last.ends_with("share=0 fused=unset"), "{last}");
    assert_eq!(ops.trim(), "REFDPO_SHARE_PROMPTS=0");
    assert!(stages.contains("== selftest-whole: exit 0"), "{stages}");
    assert!(!stages.contains("selftest-without"), "{stages}");
    // still failing: the composed ops, prompts shared again
    let (last, ops, stages) = ladder(&failing(None), false);
    assert!(last.ends_with("share=unset fused=0"), "{last}");
    assert_eq!(ops.trim(), "REFDPO_FUSED=0");
    assert!(stages.contains("== selftest-whole: exit 1"), "{stages}");
}

//! A new user's first hour: the GPU build is one make flag, the README speaks to users outside its
//! development section, a model refdpo would only approximate is refused, runs say what they did.

use super::common::{demo_config, ok, precomputed, repo};
use std::process::Command;

#[test]
fn make_with_cuda_builds_and_runs_with_the_cuda_feature() {
    let out = Command::new("make")
        .args([
            "-n",
            "precompute",
            "train",
            "CUDA=1",
            "CONFIG=pipelines/ultrafeedback-qwen2.5-0.5b.toml",
        ])
        .current_dir(repo())
        .output()
        .expect("make");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for line in ["precompute --config", "train --config"] {
        let cmd = text.lines().find(|l| l.contains(line)).unwrap_or_default();
        assert!(
            cmd.contains("--features cuda") && cmd.contains("--device cuda"),
            "{line}: {text}"
        );
    }
    assert!(
        text.contains("nvcc"),
        "the toolkit is checked first: {text}"
    );
    let plain = Command::new("make")
        .args(["-n", "precompute"])
        .current_dir(repo())
        .output()
        .unwrap();
    let plain = String::from_utf8_lossy(&plain.stdout);
    assert!(!plain.contains("cuda"), "{plain}");
}

#[test]
fn the_readme_names_no_development_paths_outside_its_development_section() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let users = &readme[..readme
        .find("\n## Development")
        .expect("a Development section")];
    for (i, line) in users.lines().enumerate() {
        assert!(!line.contains("../shared"), "README line {}: {line}", i + 1);
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn a_cuda_request_on_a_cpu_build_names_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo_config(tmp.path(), "");
    let err = super::common::fails(
        &[
            "precompute",
            "--config",
            cfg.to_str().unwrap(),
            "--device",
            "cuda",
        ],
        tmp.path(),
    );
    assert!(
        err.contains("built without CUDA")
            && err.contains("CUDA=1")
            && err.contains("--device cpu"),
        "{err}"
    );
}

#[test]
fn a_mistral_window_shorter_than_max_length_is_refused_not_approximated() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = demo_config(tmp.path(), "");
    let cfg_s = cfg.to_str().unwrap();
    let stdout = ok(&["precompute", "--config", cfg_s, "--quiet"], tmp.path());
    // The run says what it did: rows read, kept, skipped by reason, and where the files are.
    assert!(
        stdout.contains("train_prefs: 160 rows read, 156 kept, 4 skipped (empty_assistant_turn 2")
            && stdout.contains("train_prefs.arrow"),
        "{stdout}"
    );
    let model = tmp.path().join("demo/model");
    let mistral = tmp.path().join("mistral");
    std::fs::create_dir_all(&mistral).unwrap();
    for f in std::fs::read_dir(&model).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, mistral.join(f.file_name().unwrap())).unwrap();
    }
    let path = mistral.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["model_type"] = "mistral".into();
    config["architectures"] = serde_json::json!(["MistralForCausalLM"]);
    config["sliding_window"] = 64.into(); // the demo's max_length is 96
    std::fs::write(&path, config.to_string()).unwrap();
    let model_id = format!("model.id={}", mistral.display());
    let out = format!(
        "precompute.out={}",
        tmp.path().join("mistral-cache").display()
    );
    // A window shorter than the sequences is implemented (checked against transformers in
    // trl::families): accepted.
    ok(
        &[
            "precompute",
            "--config",
            cfg_s,
            "--set",
            &model_id,
            "--set",
            &out,
            "--quiet",
        ],
        tmp.path(),
    );
}

/// The `make` commands of the README's "Set up and run" blocks, continuation lines joined.
fn readme_make_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme.find("## Set up and run").unwrap();
    let end = start + readme[start..].find("\n## Commands").unwrap();
    let mut commands = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in readme[start..end].lines() {
        if line.starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if !in_block || line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        pending.push_str(line.trim_end().trim_end_matches('\\'));
        pending.push(' ');
        if !line.trim_end().ends_with('\\') {
            commands.push(std::mem::take(&mut pending));
        }
    }
    commands
        .iter()
        .flat_map(|c| {
            c.split("&&")
                .map(|p| p.split('#').next().unwrap().trim().to_string())
        })
        .filter(|c| c.starts_with("make "))
        .collect()
}

/// Every `make` line of the README's "Set up and run" blocks is a command the Makefile accepts
/// (`make -n`); the demo lines themselves run in the other tests.
#[test]
fn the_readme_make_commands_are_accepted_by_the_makefile() {
    let makes = readme_make_commands();
    assert!(makes.len() >= 8, "{makes:?}");
    for cmd in &makes {
        let out = Command::new("bash")
            .arg("-c")
            .arg(cmd.replacen("make ", "make -n ", 1))
            .current_dir(repo())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The README's LoRA next step, run as written (its `ARGS`) on a demo pipeline: it trains an
/// adapter run and merges it into a full model.
#[test]
fn the_readme_lora_block_trains_and_merges_on_the_demo() {
    let makes = readme_make_commands();
    let args_of = |target: &str| -> Vec<String> {
        let cmd = makes
            .iter()
            .find(|c| c.starts_with(&format!("make {target} ")) && c.contains("lora"))
            .unwrap_or_else(|| panic!("no LoRA `make {target}` line in the README: {makes:?}"));
        let quoted = cmd.split("ARGS=\"").nth(1).unwrap();
        quoted[..quoted.find('"').unwrap()]
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    let (tmp, cfg) = precomputed("");
    let cfg_s = cfg.to_str().unwrap();
    let mut train = vec!["train", "--config", cfg_s, "--quiet"];
    let train_args = args_of("train");
    train.extend(train_args.iter().map(String::as_str));
    let summary = ok(&train, tmp.path());
    assert!(summary.contains("LoRA:"), "{summary}");
    let mut merge = vec!["merge"];
    let merge_args = args_of("merge");
    merge.extend(merge_args.iter().map(String::as_str));
    ok(&merge, tmp.path());
    let out = merge_args
        .iter()
        .skip_while(|a| *a != "--out")
        .nth(1)
        .unwrap();
    assert!(tmp.path().join(out).join("model.safetensors").exists());
}

/// The checks a selftest run must report as passed, by name: every op and fused op in f32 and
/// bf16, each family's reference log-probs, gradients and cached decoding, LoRA on Llama and
/// Phi-3.
fn assert_every_check_passed(out: &str) {
    assert_checks_passed(out, &[]);
}

/// [`assert_every_check_passed`], but the checks whose names start with one of `left_out` (a
/// kernel's own, left out by `REFDPO_FUSED`) must be absent.
fn assert_checks_passed(out: &str, left_out: &[&str]) {
    // `ok    <name, padded>  error …  tolerance …`
    let passed: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("ok "))
        .map(|l| l.split("  error").next().unwrap_or_default().trim())
        .collect();
    let has = |name: &str| passed.contains(&name);
    let mut wanted = Vec::new();
    for d in ["f32", "bf16"] {
        for op in [
            "softmax_last_dim forward",
            "rms_norm forward",
            "rope forward",
            "softmax backward",
            "rms_norm backward",
            "rope backward",
            "silu backward",
            "fused attention row op forward",
            "fused attention row op backward",
            "fused attention row op, window 5 forward",
            "fused attention row op, window 5 backward",
            "fused rms_norm forward",
            "fused rms_norm backward (input 1)",
            "fused rms_norm backward (input 2)",
            "fused rms_norm, 8192 rows forward",
            "fused rms_norm, 8192 rows backward (input 2)",
            "bias backward, 8192 rows",
            "fused rope forward",
            "fused rope backward",
            "fused swiglu forward",
            "fused swiglu backward (input 1)",
            "fused swiglu backward (input 2)",
            "fused log-probs forward",
            "fused log-probs backward",
            "fused tiled attention forward",
            "fused tiled attention backward (input 1)",
            "fused tiled attention backward (input 2)",
            "fused tiled attention backward (input 3)",
            "fused tiled attention, window 5 forward",
            "fused tiled attention, window 5 backward (input 3)",
            "fused tiled attention, soft cap 5 forward",
            "fused tiled attention, soft cap 5 backward (input 1)",
            "fused tiled attention, heads 64 wide, T 70 forward",
            "fused tiled attention, heads 64 wide, T 70 backward (input 2)",
            "fused tiled attention, packed 17 + 70 + 5 forward",
            "fused tiled attention, packed 17 + 70 + 5 backward (input 1)",
            "fused optimizer step",
            "fused gradient norm",
            "fused accumulation in place",
            "fused 8-bit optimizer step",
            "fused 8-bit optimizer step, moments",
            "fused 8-bit optimizer step, norms",
        ] {
            wanted.push(format!("{op} {d}"));
        }
        for family in [
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "olmo2",
            "phi3",
            "gemma2",
            "gemma3_text",
        ] {
            wanted.push(format!(
                "{family} reference log-probs, packed and prompts shared, {d}"
            ));
            wanted.push(format!("{family} cached decoding logits {d}"));
            let n = match family {
                "llama" | "mistral" => 21,
                "qwen2" => 26,
                "qwen3" | "olmo2" => 25,
                "phi3" => 15,
                "gemma2" => 24,
                _ => 28,
            };
            wanted.push(format!(
                "{family} gradients of {n} parameters {d} (relative L2)"
            ));
        }
        wanted.push(format!(
            "llama LoRA gradients of 28 adapter tensors {d} (relative L2)"
        ));
        wanted.push(format!(
            "phi3 LoRA gradients of 16 adapter tensors {d} (relative L2)"
        ));
    }
    wanted.push("fused optimizer step, bf16 weights (means)".into());
    wanted.push("llama gradients through bf16 masters bf16 (relative L2)".into());
    for name in &wanted {
        if left_out.iter().any(|own| name.starts_with(own)) {
            assert!(
                !out.contains(name.as_str()),
                "`{name}` was left out, yet ran:\n{out}"
            );
        } else {
            assert!(has(name), "no passed check `{name}` in:\n{out}");
        }
    }
    assert!(!out.contains("FAIL") && out.contains(" 0 failed"), "{out}");
}

/// `refdpo selftest`: what a user runs first on a GPU; on the CPU every check passes.
#[test]
fn selftest_passes_on_the_cpu_with_one_line_per_check() {
    let tmp = tempfile::tempdir().unwrap();
    assert_every_check_passed(&ok(&["selftest", "--device", "cpu"], tmp.path()));
}

/// `REFDPO_SHARE_PROMPTS` takes 0 or 1; anything else is refused before any work, naming both.
#[test]
fn an_unknown_share_setting_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_refdpo"))
        .args(["selftest", "--device", "cpu"])
        .current_dir(tmp.path())
        .env("REFDPO_SHARE_PROMPTS", "false")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("REFDPO_SHARE_PROMPTS=\"false\": it takes 0") && err.contains("or 1"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "it ran checks");
}

/// The fused path on the CPU (`REFDPO_FUSED=1`): each family's whole forward and every
/// parameter's gradient through refdpo's fused ops (their CPU loops) against the composed ops.
#[test]
fn selftest_passes_through_the_fused_ops_on_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_refdpo"))
        .args(["selftest", "--device", "cpu"])
        .current_dir(tmp.path())
        .env("REFDPO_FUSED", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_every_check_passed(&text);
}

/// `REFDPO_FUSED=1,-name`, each kernel in turn: the fused path's selftest passes with the
/// composed ops in that kernel's place (every family's forward and gradient), the kernel's own
/// checks do not run and the report says so: a kernel that fails on a GPU costs a run that
/// kernel alone. A name it does not know is refused with those it takes.
#[test]
fn each_fused_kernel_can_be_left_out_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let selftest = |setting: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_refdpo"))
            .args(["selftest", "--device", "cpu"])
            .current_dir(tmp.path())
            .env("REFDPO_FUSED", setting)
            .output()
            .unwrap()
    };
    for (kernel, own) in [
        ("tiled", &["fused tiled attention"][..]),
        ("softmax", &["fused attention row op"]),
        ("norm", &["fused rms_norm"]),
        ("rope", &["fused rope"]),
        ("swiglu", &["fused swiglu"]),
        ("logprobs", &["fused log-probs"]),
        ("accumulate", &["fused accumulation"]),
        (
            "adamw",
            &[
                "fused optimizer step",
                "fused gradient norm",
                "fused 8-bit optimizer step",
            ],
        ),
        ("adamw8", &["fused 8-bit optimizer step"]),
    ] {
        let out = selftest(&format!("1,-{kernel}"));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "-{kernel}: {text}");
        assert_checks_passed(&text, own);
        assert!(
            text.contains(&format!(
                "left out by REFDPO_FUSED (their own checks not run): {kernel}\n"
            )) || text.ends_with(&format!("(their own checks not run): {kernel}")),
            "{text}"
        );
        let note = String::from_utf8_lossy(&out.stderr);
        assert!(
            note.contains(&format!("REFDPO_FUSED leaves out {kernel}:")),
            "{note}"
        );
    }
    let out = selftest("-flash");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("REFDPO_FUSED=\"-flash\": no fused kernel is called `flash`")
            && err.contains(
                "tiled, softmax, norm, rope, swiglu, logprobs, accumulate, adamw, adamw8"
            ),
        "{err}"
    );
}

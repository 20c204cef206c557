//! refdpo: offline Direct Preference Optimization with a cached reference model.
//!
//! Stage one ([`precompute`]) runs the frozen reference once and writes the cache; stage two
//! ([`train`]) reads it through a memory map and trains only the policy. [`inputs`] resolves a
//! run's dataset, model and tokenizer in one place.
//!
//! Layers only point down: [`LAYERS`] lists the modules bottom-up, each with the modules it may
//! use, all of them earlier in the list, so the graph has no cycle by construction. A test reads
//! every `crate::…` path in the sources and fails on an edge the table does not allow.

// Messages on stderr go through `error::note!`: `eprintln!` panics when stderr cannot be written (on
// a full disk, a closed pipe), which made every command exit 101 before doing any work.
#![deny(clippy::print_stderr)]

pub mod cache;
pub mod charts;
pub mod cli;
pub mod config;
pub mod data;
pub mod dirs;
pub mod dpo;
pub mod error;
pub mod generate;
pub mod hub;
pub mod inputs;
pub mod judge;
pub mod logprobs;
pub mod model;
pub mod outputs;
pub mod precompute;
pub mod profile;
pub mod progress;
pub mod rng;
pub mod run;
pub mod runs;
pub mod selftest;
pub mod show;
pub mod signals;
pub mod stats;
pub mod tokenize;
pub mod train;

pub use config::Config;
pub use error::{Error, Result};

#[cfg(test)]
mod test_util;

/// The module graph, bottom-up: each module and the modules it may use (`error` is everyone's;
/// the test-only `test_util` is not a layer).
pub const LAYERS: &[(&str, &[&str])] = &[
    ("error", &[]),
    ("rng", &[]),
    ("profile", &["error"]),
    ("progress", &[]),
    ("signals", &["error"]),
    ("hub", &["error"]),
    ("charts", &["error"]),
    ("dpo", &["error"]),
    ("config", &["error", "dpo"]),
    ("dirs", &["config"]),
    ("outputs", &["error", "dirs"]),
    ("cache", &["error", "config", "dirs", "signals"]),
    ("model", &["error", "config", "profile", "rng"]),
    (
        "data",
        &["error", "config", "hub", "model", "outputs", "rng"],
    ),
    ("tokenize", &["error", "config", "data", "profile"]),
    (
        "logprobs",
        &["error", "config", "model", "profile", "tokenize"],
    ),
    (
        "inputs",
        &[
            "error", "cache", "config", "data", "hub", "model", "tokenize",
        ],
    ),
    (
        "precompute",
        &[
            "error", "dirs", "cache", "config", "data", "inputs", "logprobs", "model", "outputs",
            "progress", "signals", "tokenize",
        ],
    ),
    (
        "train",
        &[
            "error", "dirs", "cache", "charts", "config", "dpo", "inputs", "logprobs", "model",
            "outputs", "profile", "progress", "rng", "signals", "tokenize",
        ],
    ),
    (
        "runs",
        &[
            "error", "config", "dirs", "inputs", "model", "outputs", "train",
        ],
    ),
    (
        "generate",
        &[
            "error", "dirs", "runs", "charts", "config", "inputs", "logprobs", "model", "outputs",
            "progress", "rng", "train",
        ],
    ),
    (
        "stats",
        &[
            "error", "dirs", "runs", "cache", "charts", "config", "generate", "inputs", "logprobs",
            "model", "train",
        ],
    ),
    (
        "judge",
        &[
            "error", "charts", "config", "data", "dirs", "generate", "hub", "model", "outputs",
            "progress", "rng", "tokenize",
        ],
    ),
    (
        "selftest",
        &["error", "config", "logprobs", "model", "train"],
    ),
    ("show", &["error", "config", "data", "inputs", "tokenize"]),
    ("cli", &["config"]),
    (
        "run",
        &[
            "error",
            "cli",
            "dirs",
            "config",
            "generate",
            "judge",
            "logprobs",
            "model",
            "outputs",
            "precompute",
            "profile",
            "selftest",
            "show",
            "signals",
            "stats",
            "train",
        ],
    ),
];

#[cfg(test)]
mod layering {
    use super::LAYERS;
    use std::collections::BTreeSet;
    use std::path::Path;

    /// The top-level module a source file belongs to (`src/model/lora.rs` → `model`).
    fn module_of(rel: &Path) -> String {
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        first.trim_end_matches(".rs").to_string()
    }

    /// Every `crate::<module>` a file's non-test code names (its `#[cfg(test)]` items cut).
    fn uses(text: &str) -> BTreeSet<String> {
        let code = match text.find("#[cfg(test)]") {
            Some(i) => &text[..i],
            None => text,
        };
        let mut out = BTreeSet::new();
        for (i, _) in code.match_indices("crate::") {
            let name: String = code[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
        out
    }

    fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    #[test]
    fn the_table_points_down_and_every_module_is_in_it() {
        let mut seen = BTreeSet::new();
        for (name, deps) in LAYERS {
            for d in *deps {
                assert!(
                    seen.contains(d),
                    "`{name}` may use `{d}`, which is not below it"
                );
            }
            assert!(seen.insert(*name), "`{name}` is listed twice");
        }
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut all = Vec::new();
        files(&src, &mut all);
        for f in &all {
            let m = module_of(f.strip_prefix(&src).unwrap());
            if !["lib", "main", "test_util"].contains(&m.as_str()) {
                assert!(seen.contains(m.as_str()), "module `{m}` is not in LAYERS");
            }
        }
    }

    #[test]
    fn no_module_uses_one_the_table_does_not_allow() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut all = Vec::new();
        files(&src, &mut all);
        let mut bad = Vec::new();
        for f in &all {
            let rel = f.strip_prefix(&src).unwrap();
            let m = module_of(rel);
            let Some((_, allowed)) = LAYERS.iter().find(|(n, _)| *n == m) else {
                continue;
            };
            for used in uses(&std::fs::read_to_string(f).unwrap()) {
                if used != m && used != "test_util" && !allowed.contains(&used.as_str()) {
                    bad.push(format!("{} uses crate::{used}", rel.display()));
                }
            }
        }
        assert!(
            bad.is_empty(),
            "edges LAYERS does not allow:\n{}",
            bad.join("\n")
        );
    }

    #[test]
    fn the_reader_finds_paths_and_skips_tests() {
        let u = uses("use crate::model::x;\nfn f() { crate::rng::uniform(1, 2); }\n#[cfg(test)]\nmod tests { use crate::stats; }");
        assert_eq!(u, ["model", "rng"].map(String::from).into_iter().collect());
    }
}

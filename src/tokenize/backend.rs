//! `tokenizer.json` → the tokenizer transformers 5.24's `AutoTokenizer` actually runs. It picks a
//! class from `tokenizer_config.json`'s `tokenizer_class` and `config.json`'s `model_type`
//! ([`resolve`], after `models/auto/tokenization_auto.py`); `TokenizersBackend` (what
//! `PreTrainedTokenizerFast` is now) runs the file as is, while a class with its own constructor
//! keeps the file's vocabulary, merges, added tokens and post-processor but rebuilds the
//! normalizer, pre-tokenizer and BPE settings its own way. SmolLM2 is one such case: its file
//! splits digits (`Digits` before `ByteLevel`), but `GPT2Tokenizer` drops that, so `":\n\n1"`
//! encodes as `":" "\n" "\n" "1"`; a Llama-2 style file (a `Prepend("▁")` normalizer) runs under
//! `LlamaTokenizer`'s `Metaspace`, which prepends "▁" once, not after every special token. TRL's
//! token ids come from transformers, so refdpo does the same.

use crate::error::{fs, Error, Result};
use serde_json::{json, Value};
use std::path::Path;

/// Qwen2Tokenizer's split pattern (transformers `models/qwen2/tokenization_qwen2.py`).
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pipelines refdpo runs: the file as is, or a class's rebuild of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pipeline {
    AsIs,
    Gpt2,
    Qwen2,
    Llama,
    Gemma,
}

/// The tokenizer class transformers registers for a supported `model_type`
/// (`TOKENIZER_MAPPING_NAMES`, "Fast" left off; `llama` has none).
fn registered(model_type: &str) -> Option<&'static str> {
    match model_type {
        "mistral" | "olmo2" | "phi3" => Some("TokenizersBackend"),
        "qwen2" | "qwen3" => Some("Qwen2Tokenizer"),
        "gemma2" | "gemma3_text" | "gemma3" => Some("GemmaTokenizer"),
        _ => None,
    }
}

/// Model types whose hub `tokenizer_class` transformers overrides with its registered one
/// (`MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS`, the supported ones).
const INCORRECT_HUB_CLASS: [&str; 2] = ["qwen2", "phi3"];

/// Classes that run the file as is ("Fast" left off: `PreTrainedTokenizerFast` is one).
const AS_IS: [&str; 3] = ["TokenizersBackend", "PythonBackend", "PreTrainedTokenizer"];

fn pipeline_of(class: &str) -> std::result::Result<Pipeline, String> {
    match class.trim_end_matches("Fast") {
        "GPT2Tokenizer" => Ok(Pipeline::Gpt2),
        "Qwen2Tokenizer" => Ok(Pipeline::Qwen2),
        "LlamaTokenizer" => Ok(Pipeline::Llama),
        "GemmaTokenizer" => Ok(Pipeline::Gemma),
        c if AS_IS.contains(&c) => Ok(Pipeline::AsIs),
        _ => Err(format!(
            "`tokenizer_class` = {class:?}: transformers rebuilds that class's pipeline in a way \
             refdpo does not implement (it runs PreTrainedTokenizerFast/TokenizersBackend, \
             GPT2Tokenizer, Qwen2Tokenizer, LlamaTokenizer and GemmaTokenizer)"
        )),
    }
}

/// The pipeline `AutoTokenizer.from_pretrained` picks for a folder, from its
/// `tokenizer_config.json` class, `config.json` (`model_type`, `tokenizer_class`) and whether
/// `tokenizer.json` mentions `"ByteLevel"`, in transformers 5.24's order.
pub fn resolve(
    config_class: Option<&str>,
    model_type: Option<&str>,
    model_class: Option<&str>,
    byte_level: bool,
) -> std::result::Result<Pipeline, String> {
    let hub = config_class.or(model_class);
    let base = |c: &str| c.trim_end_matches("Fast").to_string();
    let incorrect = model_type.is_some_and(|t| INCORRECT_HUB_CLASS.contains(&t));
    // a hub `LlamaTokenizer` over a ByteLevel file (Llama-3 style): the file as is
    if hub.is_some_and(|h| base(h) == "LlamaTokenizer") && !incorrect && byte_level {
        return Ok(Pipeline::AsIs);
    }
    if let (Some(h), Some(reg)) = (hub, model_type.and_then(registered)) {
        if base(h) != reg {
            if reg == "TokenizersBackend" {
                return Ok(Pipeline::AsIs);
            }
            return pipeline_of(if incorrect { reg } else { h });
        }
    }
    match (hub, model_type.and_then(registered)) {
        (Some(h), _) => pipeline_of(h),
        (None, Some(reg)) => pipeline_of(reg),
        (None, None) => Ok(Pipeline::AsIs),
    }
}

/// Rewrites the pipeline of a parsed `tokenizer.json` the way the class's constructor does
/// (`cfg`: `tokenizer_config.json`).
pub fn apply_class_pipeline(tok: &mut Value, pipeline: Pipeline, cfg: &Value) {
    let flag = |k: &str| cfg.get(k).and_then(Value::as_bool);
    let prefix = flag("add_prefix_space").unwrap_or(false);
    let bpe_defaults = |tok: &mut Value| {
        if let Some(m) = tok.get_mut("model").and_then(Value::as_object_mut) {
            for (k, v) in [
                ("dropout", Value::Null),
                ("continuing_subword_prefix", json!("")),
                ("end_of_word_suffix", json!("")),
                ("fuse_unk", json!(false)),
                ("byte_fallback", json!(false)),
                // `BPE(...)`'s own defaults, which the classes do not pass: no unknown token (an
                // unknown byte is dropped), merges never skipped for a word in the vocabulary
                ("unk_token", Value::Null),
                ("ignore_merges", json!(false)),
            ] {
                m.insert(k.into(), v);
            }
        }
    };
    // LlamaTokenizer's and GemmaTokenizer's BPE: unknown characters fall back to byte tokens
    let sentencepiece_bpe = |tok: &mut Value, unk: Value| {
        if let Some(m) = tok.get_mut("model").and_then(Value::as_object_mut) {
            for (k, v) in [
                ("dropout", Value::Null),
                ("unk_token", unk),
                ("continuing_subword_prefix", Value::Null),
                ("end_of_word_suffix", Value::Null),
                ("fuse_unk", json!(true)),
                ("byte_fallback", json!(true)),
                ("ignore_merges", json!(false)),
            ] {
                m.insert(k.into(), v);
            }
        }
    };
    match pipeline {
        Pipeline::AsIs => {}
        Pipeline::Gpt2 => {
            bpe_defaults(tok);
            tok["normalizer"] = Value::Null;
            tok["pre_tokenizer"] = json!({"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": true, "use_regex": true});
            tok["decoder"] = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
        }
        Pipeline::Llama => {
            // `models/llama/tokenization_llama.py`: no normalizer; Metaspace prepends "▁" to the
            // first piece ("first", the default `legacy = false`), every piece under
            // `legacy = true`, none under `add_prefix_space = false`
            sentencepiece_bpe(tok, Value::Null);
            let scheme = match (
                flag("add_prefix_space").unwrap_or(true),
                flag("legacy").unwrap_or(false),
            ) {
                (false, _) => "never",
                (true, false) => "first",
                (true, true) => "always",
            };
            tok["normalizer"] = Value::Null;
            tok["pre_tokenizer"] = json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": false});
        }
        Pipeline::Gemma => {
            // `models/gemma/tokenization_gemma.py`: spaces become "▁", split after each
            let unk = cfg.get("unk_token").map_or_else(
                || json!("<unk>"),
                |u| match u {
                    Value::Object(o) => o.get("content").cloned().unwrap_or(Value::Null),
                    other => other.clone(),
                },
            );
            sentencepiece_bpe(tok, unk);
            tok["normalizer"] =
                json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"});
            tok["pre_tokenizer"] = json!({"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false});
        }
        Pipeline::Qwen2 => {
            bpe_defaults(tok);
            tok["normalizer"] = json!({"type": "NFC"});
            tok["pre_tokenizer"] = json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": true, "use_regex": false}
            ]});
            tok["decoder"] = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
        }
    }
}

/// What a normalizer can make of a text of n bytes, at most: `factor`·n + `added` bytes, through
/// `steps` normalizers. A `Replace` multiplies by its content's bytes per byte of its pattern (a
/// regex may match one byte), `ByteLevel` by 2 (a byte becomes a character of up to 2 bytes),
/// `Prepend` adds its bytes, a `Sequence` composes its parts.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Growth {
    factor: f64,
    added: f64,
    steps: usize,
}

fn normalizer_growth(v: &Value) -> Growth {
    let one = Growth {
        factor: 1.0,
        added: 0.0,
        steps: 1,
    };
    match v.get("type").and_then(Value::as_str) {
        None => Growth { steps: 0, ..one },
        Some("Sequence") => v["normalizers"].as_array().map_or(one, |parts| {
            parts
                .iter()
                .map(normalizer_growth)
                .fold(Growth { steps: 0, ..one }, |g, p| Growth {
                    factor: g.factor * p.factor,
                    added: g.added * p.factor + p.added,
                    steps: g.steps + p.steps,
                })
        }),
        Some("Replace") => {
            let content = v["content"].as_str().map_or(0, str::len) as f64;
            let pattern = v["pattern"]["String"].as_str().map_or(1, str::len).max(1) as f64;
            Growth {
                factor: (content / pattern).max(1.0),
                ..one
            }
        }
        Some("ByteLevel") => Growth { factor: 2.0, ..one },
        Some("Prepend") | Some("Append") => Growth {
            added: v["prepend"]
                .as_str()
                .or(v["append"].as_str())
                .map_or(0, str::len) as f64,
            ..one
        },
        _ => one,
    }
}

/// The most a normalizer may multiply a text's length (real ones: "▁" for " ", 3 bytes for 1),
/// the most bytes it may add, and the most normalizers it may chain (real ones: a few).
const MAX_GROWTH: f64 = 4096.0;
const MAX_ADDED: f64 = 65536.0;
const MAX_STEPS: usize = 64;

/// A tokenizer refdpo can score with: the same ids on every run (no BPE dropout) and a text no
/// normalizer blows up past memory.
fn check_determinism_and_growth(tok: &Value) -> std::result::Result<(), String> {
    // tokenizers strips the prefix from each merge's second part unchecked: a part that does
    // not start with it panicked, or cut a character in two
    if let Some(prefix) = tok["model"]["continuing_subword_prefix"]
        .as_str()
        .filter(|p| !p.is_empty() && tok["model"]["type"] == "BPE")
    {
        let merges = tok["model"]["merges"].as_array().into_iter().flatten();
        let second = |m: &Value| match m {
            Value::String(s) => s.split_once(' ').map(|(_, b)| b.to_string()),
            Value::Array(pair) => pair.get(1).and_then(Value::as_str).map(String::from),
            _ => None,
        };
        if let Some(b) = merges.filter_map(second).find(|b| !b.starts_with(prefix)) {
            return Err(format!(
                "its BPE `continuing_subword_prefix` is {prefix:?}, but the merge part {b:?} does \
                 not start with it: the merges belong to another tokenizer"
            ));
        }
    }
    if let Some(p) = tok["model"]["dropout"].as_f64().filter(|&p| p > 0.0) {
        return Err(format!(
            "its BPE `dropout` is {p}: every run would tokenize the rows differently (a cache \
             must be the same each time); set `model.dropout` to null"
        ));
    }
    let g = normalizer_growth(&tok["normalizer"]);
    if g.factor > MAX_GROWTH || g.added > MAX_ADDED || g.steps > MAX_STEPS {
        return Err(format!(
            "its normalizer can make a text of n bytes {:.0}·n + {:.0} bytes long through {} \
             steps, more than any tokenizer needs ({MAX_GROWTH:.0}·n + {MAX_ADDED:.0}, \
             {MAX_STEPS} steps): the file is damaged or hostile",
            g.factor, g.added, g.steps
        ));
    }
    Ok(())
}

/// Loads `<dir>/tokenizer.json` as transformers 5 would run it; also returns the file's bytes
/// (the fingerprint hashes the file itself).
pub fn load(dir: &Path) -> Result<(tokenizers::Tokenizer, Vec<u8>)> {
    let path = dir.join("tokenizer.json");
    let bytes = fs::read(&path)?;
    let bad = |e: &dyn std::fmt::Display| {
        Error::Tokenize(format!("cannot load `{}`: {e}", path.display()))
    };
    let read_json = |name: &str| -> Value {
        crate::error::fs::read_to_string(dir.join(name))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null)
    };
    let (cfg, model) = (read_json("tokenizer_config.json"), read_json("config.json"));
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(String::from);
    let byte_level = bytes.windows(11).any(|w| w == b"\"ByteLevel\"");
    let pipeline = resolve(
        text(&cfg, "tokenizer_class").as_deref(),
        text(&model, "model_type").as_deref(),
        text(&model, "tokenizer_class").as_deref(),
        byte_level,
    )
    .map_err(|why| Error::Tokenize(format!("`{}`: {why}", dir.display())))?;
    let mut json: Value = serde_json::from_slice(&bytes).map_err(|e| bad(&e))?;
    check_determinism_and_growth(&json).map_err(|why| bad(&why))?;
    super::added::check_added_tokens_listed(&json, &cfg, pipeline, dir)?;
    apply_class_pipeline(&mut json, pipeline, &cfg);
    let flags_changed = super::added::added_token_flags(&mut json, &cfg);
    let file = if pipeline == Pipeline::AsIs && !flags_changed {
        bytes.clone()
    } else {
        serde_json::to_vec(&json)?
    };
    // tokenizers panics on some damaged files (a `Precompiled` normalizer whose map does not
    // parse): an error naming the file, as its other load errors are
    let tokenizer = crate::error::catch_quietly(|| tokenizers::Tokenizer::from_bytes(&file))
        .map_err(|panic| bad(&format!("the tokenizers library stopped on it ({panic})")))?
        .map_err(|e| bad(&e))?;
    let mut tokenizer = tokenizer;
    super::added::check_special_tokens(&tokenizer, &cfg, dir)?;
    super::added::add_named_special_tokens(&mut tokenizer, &cfg, dir)?;
    // transformers' `split_special_tokens`: special tokens in the text are split like any text
    if cfg.get("split_special_tokens").and_then(Value::as_bool) == Some(true) {
        tokenizer.set_encode_special_tokens(true);
    }
    // transformers encodes with truncation and padding off unless asked; a `truncation` block in
    // the file (SmolLM2's says 1024) would otherwise silently cut every sequence.
    tokenizer.with_truncation(None).map_err(|e| bad(&e))?;
    tokenizer.with_padding(None);
    Ok((tokenizer, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Model folders of every supported family's tokenizer layouts (a Llama-2 style SentencePiece
    /// BPE file and a ByteLevel one, under each class and `model_type` transformers treats
    /// differently): refdpo picks transformers 5.24's class and encodes as it does
    /// (tests/fixtures/tokenizer_classes/, made by gen_tokenizer_class_fixtures.py).
    #[test]
    fn tokenizer_classes_encode_as_transformers() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer_classes");
        let read = |p: &Path| -> Value {
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
        };
        let fx = read(&root.join("expected.json"));
        let texts: Vec<&str> = fx["texts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        let cases = fx["cases"].as_array().unwrap();
        assert!(cases.len() >= 16);
        let mut pipelines = std::collections::BTreeSet::new();
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let dir = tempfile::tempdir().unwrap();
            let file = root.join(format!("{}.json", case["file"].as_str().unwrap()));
            std::fs::copy(&file, dir.path().join("tokenizer.json")).unwrap();
            for (f, key) in [
                ("tokenizer_config.json", "tokenizer_config"),
                ("config.json", "config"),
            ] {
                std::fs::write(dir.path().join(f), case[key].to_string()).unwrap();
            }
            let want = match case["class"].as_str().unwrap() {
                "TokenizersBackend" => Pipeline::AsIs,
                "GPT2Tokenizer" => Pipeline::Gpt2,
                "Qwen2Tokenizer" => Pipeline::Qwen2,
                "LlamaTokenizer" => Pipeline::Llama,
                "GemmaTokenizer" => Pipeline::Gemma,
                other => panic!("{name}: transformers chose {other}"),
            };
            let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(String::from);
            let got = resolve(
                text(&case["tokenizer_config"], "tokenizer_class").as_deref(),
                text(&case["config"], "model_type").as_deref(),
                None,
                std::fs::read_to_string(&file)
                    .unwrap()
                    .contains("\"ByteLevel\""),
            )
            .unwrap();
            assert_eq!(got, want, "{name}");
            pipelines.insert(format!("{got:?}"));
            let (tok, _) = load(dir.path()).unwrap();
            for (key, special) in [("ids", false), ("ids_with_special_tokens", true)] {
                for (t, ids) in texts.iter().zip(case[key].as_array().unwrap()) {
                    let want: Vec<u32> = ids
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|i| i.as_u64().unwrap() as u32)
                        .collect();
                    let got = tok.encode(*t, special).unwrap().get_ids().to_vec();
                    assert_eq!(got, want, "{name} {key} {t:?}");
                }
            }
        }
        assert_eq!(pipelines.len(), 5, "{pipelines:?}");
    }

    /// Files the tokenizers library panics on are an error naming the file (fuzzer: exit 101):
    /// a `Precompiled` normalizer whose map does not parse, and BPE merges whose second part
    /// lacks the `continuing_subword_prefix` (tokenizers strips it unchecked).
    #[test]
    fn files_the_tokenizers_library_panics_on_are_errors() {
        let bpe = |prefix: &str| {
            json!({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "##b": 2, "ab": 3},
                "merges": ["a ##b"], "continuing_subword_prefix": prefix}})
        };
        let cases = [
            (
                json!({"normalizer": {"type": "Precompiled", "precompiled_charsmap": "AAAA"},
                    "model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}),
                "the tokenizers library stopped on it",
            ),
            (bpe("#!"), "the merge part \"##b\" does not start with it"),
        ];
        for (file, said) in cases {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("tokenizer.json"), file.to_string()).unwrap();
            let e = load(dir.path()).err().unwrap().to_string();
            assert!(e.contains("tokenizer.json") && e.contains(said), "{e}");
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), bpe("##").to_string()).unwrap();
        load(dir.path()).unwrap();
    }

    #[test]
    fn a_class_whose_rebuild_refdpo_lacks_is_refused_by_name() {
        let e = resolve(Some("T5Tokenizer"), Some("llama"), None, false).unwrap_err();
        assert!(e.contains("T5Tokenizer"), "{e}");
    }
}

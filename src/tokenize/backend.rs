//! `tokenizer.json` → the tokenizer transformers 5 actually runs. transformers 5 uses the file as is
//! only for `tokenizer_class: PreTrainedTokenizerFast`; a class with its own constructor keeps the
//! file's vocabulary, merges, added tokens and post-processor but rebuilds the normalizer,
//! pre-tokenizer and decoder its own way. SmolLM2 is one such case: its file splits digits
//! (`Digits` before `ByteLevel`), but `GPT2Tokenizer` drops that, so `":\n\n1"` encodes as
//! `":" "\n" "\n" "1"`. TRL's token ids come from transformers, so refdpo does the same.

use crate::error::{fs, Error, Result};
use serde_json::{json, Value};
use std::path::Path;

/// Qwen2Tokenizer's split pattern (transformers `models/qwen2/tokenization_qwen2.py`).
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The class transformers would instantiate, from `tokenizer_config.json` (`Fast` suffix ignored).
fn tokenizer_class(dir: &Path) -> Option<(String, Value)> {
    let text = crate::error::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
    let cfg: Value = serde_json::from_str(&text).ok()?;
    let class = cfg
        .get("tokenizer_class")?
        .as_str()?
        .trim_end_matches("Fast")
        .to_string();
    Some((class, cfg))
}

/// Rewrites the pipeline of a parsed `tokenizer.json` the way the named class's constructor does.
pub fn apply_class_pipeline(tok: &mut Value, class: &str, cfg: &Value) -> bool {
    let prefix = cfg
        .get("add_prefix_space")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let bpe_defaults = |tok: &mut Value| {
        if let Some(m) = tok.get_mut("model").and_then(Value::as_object_mut) {
            for (k, v) in [
                ("dropout", Value::Null),
                ("continuing_subword_prefix", json!("")),
                ("end_of_word_suffix", json!("")),
                ("fuse_unk", json!(false)),
                ("byte_fallback", json!(false)),
            ] {
                m.insert(k.into(), v);
            }
        }
    };
    match class {
        "GPT2Tokenizer" => {
            bpe_defaults(tok);
            tok["normalizer"] = Value::Null;
            tok["pre_tokenizer"] = json!({"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": true, "use_regex": true});
            tok["decoder"] = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
            true
        }
        "Qwen2Tokenizer" => {
            bpe_defaults(tok);
            tok["normalizer"] = json!({"type": "NFC"});
            tok["pre_tokenizer"] = json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": true, "use_regex": false}
            ]});
            tok["decoder"] = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
            true
        }
        _ => false,
    }
}

/// Loads `<dir>/tokenizer.json` as transformers 5 would run it; also returns the file's bytes
/// (the fingerprint hashes the file itself).
pub fn load(dir: &Path) -> Result<(tokenizers::Tokenizer, Vec<u8>)> {
    let path = dir.join("tokenizer.json");
    let bytes = fs::read(&path)?;
    let bad = |e: &dyn std::fmt::Display| {
        Error::Tokenize(format!("cannot load `{}`: {e}", path.display()))
    };
    let tokenizer = match tokenizer_class(dir) {
        Some((class, cfg)) => {
            let mut json: Value = serde_json::from_slice(&bytes).map_err(|e| bad(&e))?;
            if apply_class_pipeline(&mut json, &class, &cfg) {
                tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&json)?)
                    .map_err(|e| bad(&e))?
            } else {
                tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| bad(&e))?
            }
        }
        None => tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| bad(&e))?,
    };
    // transformers encodes with truncation and padding off unless asked; a `truncation` block in
    // the file (SmolLM2's says 1024) would otherwise silently cut every sequence.
    let mut tokenizer = tokenizer;
    tokenizer.with_truncation(None).map_err(|e| bad(&e))?;
    tokenizer.with_padding(None);
    Ok((tokenizer, bytes))
}

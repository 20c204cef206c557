//! What a model folder asks of `generate`, read as transformers' `GenerationConfig` reads it: the
//! ids that end a generation, `repetition_penalty` (applied by transformers' greedy decoding too),
//! `top_k` (its sampling's default, 50) and `top_p`, and the settings refdpo does not apply.

use crate::error::{fs, Error, Result};
use serde_json::Value;
use std::path::Path;

/// transformers' default `top_k` when sampling.
pub const TOP_K: usize = 50;

/// Settings of `generation_config.json` that change transformers' `generate` and that refdpo's
/// does not apply. (transformers gives a decoder-only model's prompt as its encoder input too, so
/// the `encoder_` settings apply to it.)
const UNAPPLIED: [&str; 26] = [
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "penalty_alpha",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "encoder_repetition_penalty",
    "min_length",
    "min_new_tokens",
    "bad_words_ids",
    "force_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "sequence_bias",
    "exponential_decay_length_penalty",
    "guidance_scale",
    "watermarking_config",
    "min_p",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "top_h",
    "stop_strings",
    "max_time",
];

/// Whether `v` leaves `key` off, by transformers' own conditions for adding its processor.
fn is_off(key: &str, v: &Value) -> bool {
    let x = v.as_f64();
    let empty = v.as_array().is_some_and(Vec::is_empty)
        || v.as_object().is_some_and(|o| o.is_empty())
        || v.as_str().is_some_and(str::is_empty);
    v.is_null()
        || empty
        || match key {
            "num_beams" | "num_beam_groups" | "guidance_scale" => x.is_some_and(|x| x <= 1.0),
            "encoder_repetition_penalty" => x == Some(1.0),
            "typical_p" => x.is_some_and(|x| x >= 1.0),
            "epsilon_cutoff" | "eta_cutoff" => x.is_some_and(|x| !(x > 0.0 && x < 1.0)),
            "diversity_penalty"
            | "penalty_alpha"
            | "no_repeat_ngram_size"
            | "encoder_no_repeat_ngram_size"
            | "min_length"
            | "min_new_tokens"
            | "min_p" => x.is_some_and(|x| x <= 0.0),
            _ => false,
        }
}

/// A model folder's generation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelDefaults {
    /// `generation_config.json`'s `eos_token_id` (one or a list), else `config.json`'s, plus the
    /// tokenizer's EOS token.
    pub eos: Vec<u32>,
    /// 1: none.
    pub repetition_penalty: f64,
    /// 0: none.
    pub top_k: usize,
    /// 1: none.
    pub top_p: f64,
    /// The settings present that refdpo does not apply (`key = value`).
    pub unapplied: Vec<String>,
    /// The file's sampling settings where it sets `do_sample = true` (`key = value`):
    /// transformers' `generate()` then samples by default, refdpo only with `--temperature`.
    pub samples_by_default: Option<String>,
}

impl ModelDefaults {
    /// `sampling`: whether `top_k` and `top_p` will be used. transformers checks them only
    /// then; greedy decoding ignores them (defaults in their place), valid or not.
    pub fn read(
        model_dir: &Path,
        tokenizer: &tokenizers::Tokenizer,
        sampling: bool,
    ) -> Result<Self> {
        let gen_path = model_dir.join("generation_config.json");
        let gen: Value = if gen_path.exists() {
            fs::read_json(&gen_path)?
        } else {
            Value::Null
        };
        if gen_path.exists() && !gen.is_object() {
            return Err(Error::Model(format!(
                "`{}`: the file holds {}, not an object of settings (transformers' \
                 GenerationConfig refuses it too): fix or remove it",
                gen_path.display(),
                kind(&gen)
            )));
        }
        // `key`'s value read by `read`, `default` where absent or null; else an error naming it
        let setting = |key: &str, default, want: &str, read: &dyn Fn(&Value) -> Option<f64>| {
            match &gen[key] {
                Value::Null => Ok(default),
                v => read(v).ok_or_else(|| {
                    Error::Model(format!(
                        "`{}`: `{key}` is {v}, not {want}: fix or remove it",
                        gen_path.display()
                    ))
                }),
            }
        };
        // transformers refuses a whole number other than 1 ("`penalty` has to be a strictly
        // positive float"): 2 where 2.0 was meant
        let repetition_penalty = setting(
            "repetition_penalty",
            1.0,
            "a decimal number above 0 (transformers refuses a whole number: write 2.0 for 2)",
            &|v| {
                v.as_f64()
                    .filter(|p| p.is_finite() && *p > 0.0 && (v.is_f64() || *p == 1.0))
            },
        )?;
        let (top_k, top_p) = if sampling {
            let top_k = setting("top_k", TOP_K as f64, "a whole number >= 0", &|v| {
                v.as_u64().map(|k| k as f64)
            })? as usize;
            let top_p = setting("top_p", 1.0, "a number in [0, 1]", &|v| {
                v.as_f64().filter(|p| (0.0..=1.0).contains(p))
            })?;
            (top_k, top_p)
        } else {
            (TOP_K, 1.0)
        };
        let samples_by_default = truthy(&gen["do_sample"]).then(|| {
            ["do_sample", "temperature", "top_k", "top_p"]
                .iter()
                .filter(|key| !gen[**key].is_null())
                .map(|key| format!("{key} = {}", gen[*key]))
                .collect::<Vec<_>>()
                .join(", ")
        });
        let unapplied = UNAPPLIED
            .iter()
            .filter(|key| !is_off(key, &gen[**key]))
            .map(|key| format!("{key} = {}", gen[*key]))
            .collect();
        Ok(Self {
            eos: eos_ids(model_dir, tokenizer)?,
            repetition_penalty,
            top_k,
            top_p,
            unapplied,
            samples_by_default,
        })
    }
}

/// Whether Python reads the value as true (`if generation_config.do_sample:`): a non-empty
/// string or list, a number other than 0, true.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|x| x != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        Value::Null => false,
    }
}

/// A JSON value's kind, as an error names it.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Array(_) => "a list",
        Value::String(_) => "a string",
        Value::Number(_) => "a number",
        Value::Bool(_) => "a boolean",
        Value::Null => "null",
        Value::Object(_) => "an object",
    }
}

/// The ids that end a generation: `generation_config.json`'s `eos_token_id` (one or a list), else
/// `config.json`'s, plus the tokenizer's EOS token.
fn eos_ids(model_dir: &Path, tokenizer: &tokenizers::Tokenizer) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for file in ["generation_config.json", "config.json"] {
        let path = model_dir.join(file);
        if !path.exists() {
            continue;
        }
        let v: Value = fs::read_json(&path)?;
        let listed = match &v["eos_token_id"] {
            Value::Array(items) => items.clone(),
            Value::Null => continue,
            one => vec![one.clone()],
        };
        let vocab = tokenizer.get_vocab_size(true);
        for id in listed {
            // never a wrapped or dropped id: a generation would stop at another token, or not at all
            match id.as_u64().filter(|&x| x < vocab as u64) {
                Some(x) => ids.push(x as u32),
                None => {
                    return Err(Error::Model(format!(
                        "`{}`: `eos_token_id` {id} is not a token id of this tokenizer ({vocab} \
                         tokens): fix or remove it",
                        path.display()
                    )))
                }
            }
        }
        break;
    }
    let cfg_path = model_dir.join("tokenizer_config.json");
    if cfg_path.exists() {
        let v: Value = fs::read_json(&cfg_path)?;
        let token = match &v["eos_token"] {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
            _ => None,
        };
        ids.extend(token.and_then(|t| tokenizer.token_to_id(&t)));
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

//! Keys: `--set section.key=value` overrides, and unknown keys as errors that list the known ones.

use super::Config;
use crate::error::{Error, Result};

/// Where a config's keys came from, for errors: the file, or a `--set` override.
pub(super) struct Origin<'a> {
    pub file: &'a str,
    /// The dotted keys given by `--set`.
    pub set: &'a [String],
}

impl Origin<'_> {
    /// The `--set` key that gave `key` (a dotted path, or a section), if one did.
    fn set_key(&self, key: &str) -> Option<&str> {
        self.set
            .iter()
            .find(|k| {
                key == k.as_str()
                    || key.starts_with(&format!("{k}."))
                    || key.starts_with(&format!("{k}["))
                    || k.starts_with(&format!("{key}."))
            })
            .map(String::as_str)
    }

    /// "in `file`", or "given by `--set key=…`".
    pub fn of(&self, key: &str) -> String {
        match self.set_key(key) {
            Some(k) => format!("given by `--set {k}=…`"),
            None => format!("in `{}`", self.file),
        }
    }

    /// A type error's hint: a `--set` value is read as TOML, so a string of digits needs quotes.
    pub fn hint(&self, key: &str, message: &str) -> String {
        match self.set_key(key) {
            Some(k) if message.contains("expected a string") => {
                format!("; a --set value is read as TOML, so quote a string: --set '{k}=\"…\"'")
            }
            Some(k) if message.contains("expected a sequence") => {
                format!("; a --set value is read as TOML, so write a list: --set '{k}=[\"…\"]'")
            }
            _ => String::new(),
        }
    }
}

/// Applies one `section.key=value` override (deeper keys too: `dataset.columns.prompt=…`); the
/// value is read as TOML, else taken as a string. Returns the dotted key.
pub fn apply_override(table: &mut toml::Table, item: &str) -> Result<String> {
    let (key, raw) = item
        .split_once('=')
        .ok_or_else(|| Error::Config(format!("--set `{item}`: expected section.key=value")))?;
    let path: Vec<&str> = key.trim().split('.').collect();
    let Some((name, tables)) = path.split_last().filter(|(_, t)| !t.is_empty()) else {
        return Err(Error::Config(format!(
            "--set `{item}`: the key must be section.key, e.g. train.beta"
        )));
    };
    let mut current = table;
    for (depth, part) in tables.iter().enumerate() {
        let entry = current
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(next) = entry else {
            return Err(Error::Config(format!(
                "--set `{item}`: `{}` is not a table",
                tables[..=depth].join(".")
            )));
        };
        current = next;
    }
    current.insert(name.to_string(), parse_value(raw.trim()));
    Ok(path.join("."))
}

fn parse_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        // a value with more TOML after a newline (`4\nbeta = 9`) is not one value: read as a
        // string, which a key of another type refuses by name (the rest had been dropped)
        .filter(|t| t.len() == 1)
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

/// Unknown keys are an error that names the key and lists the known ones.
pub(super) fn check_known_keys(table: &toml::Table, origin: &Origin) -> Result<()> {
    let defaults = toml::Value::try_from(Config::default()).expect("default config serializes");
    let toml::Value::Table(known) = defaults else {
        unreachable!()
    };
    for (section, value) in table {
        let Some(toml::Value::Table(known_keys)) = known.get(section) else {
            let names: Vec<_> = known.keys().map(String::as_str).collect();
            return Err(Error::Config(format!(
                "unknown section `[{section}]` {}; known sections: {}",
                origin.of(section),
                names.join(", ")
            )));
        };
        let toml::Value::Table(keys) = value else {
            return Err(Error::Config(format!(
                "`{section}` {} must be a table",
                origin.of(section)
            )));
        };
        for key in keys.keys() {
            if !known_keys.contains_key(key) {
                let names: Vec<_> = known_keys.keys().map(String::as_str).collect();
                return Err(Error::Config(format!(
                    "unknown key `{section}.{key}` {}; {}known keys of [{section}]: {}",
                    origin.of(&format!("{section}.{key}")),
                    trl_option(key)
                        .map(|h| format!("{h}; "))
                        .unwrap_or_default(),
                    names.join(", ")
                )));
            }
        }
    }
    Ok(())
}

/// TRL 1.16 `DPOConfig` options that are not refdpo keys: refdpo's equivalent, or that it has none.
const TRL_OPTIONS: [(&str, &str); 28] = [
    ("max_length", "refdpo's is `tokenize.max_length`"),
    ("truncation_mode", "refdpo's is `tokenize.truncation`"),
    ("loss_type", "refdpo's is `train.loss`"),
    (
        "precompute_ref_log_probs",
        "refdpo always precomputes them (`refdpo precompute`)",
    ),
    (
        "precompute_ref_batch_size",
        "refdpo's is `precompute.batch_size`",
    ),
    (
        "per_device_train_batch_size",
        "refdpo's is `train.batch_size`",
    ),
    (
        "gradient_accumulation_steps",
        "refdpo's is `train.grad_accum`",
    ),
    ("lr_scheduler_type", "refdpo's is `train.lr_schedule`"),
    ("logging_steps", "refdpo's is `train.log_every`"),
    ("eval_steps", "refdpo's is `train.eval_every`"),
    ("save_steps", "refdpo's is `train.save_every`"),
    (
        "warmup_steps",
        "refdpo's is `train.warmup_ratio` (a fraction of the steps)",
    ),
    (
        "bf16",
        "refdpo's is `model.dtype = \"bf16\"` (with `train.master_dtype` for f32 masters)",
    ),
    ("fp16", "refdpo's is `model.dtype = \"f16\"`"),
    ("output_dir", "refdpo's is `train.out`"),
    (
        "per_device_eval_batch_size",
        "refdpo evaluates with `train.batch_size`",
    ),
    ("num_train_epochs", "refdpo's is `train.epochs`"),
    ("disable_dropout", "refdpo's models run without dropout"),
    ("ld_alpha", NOT_IMPLEMENTED),
    ("f_divergence_type", NOT_IMPLEMENTED),
    ("f_alpha_divergence_coef", NOT_IMPLEMENTED),
    ("use_weighting", NOT_IMPLEMENTED),
    ("sync_ref_model", NOT_IMPLEMENTED),
    ("ref_model_mixup_alpha", NOT_IMPLEMENTED),
    ("ref_model_sync_steps", NOT_IMPLEMENTED),
    ("padding_free", NOT_IMPLEMENTED),
    ("pad_to_multiple_of", NOT_IMPLEMENTED),
    ("activation_offloading", NOT_IMPLEMENTED),
];

const NOT_IMPLEMENTED: &str = "refdpo does not implement it";

/// A hint for a key that is a TRL option.
fn trl_option(key: &str) -> Option<String> {
    TRL_OPTIONS
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(k, what)| format!("`{k}` is TRL's DPOConfig option: {what}"))
}

/// The dotted keys whose values differ between two configurations' TOML (each key with its value
/// in `old` and in `new`, `-` where absent), in key order; an unreadable `old` differs nowhere.
pub fn differences(old: &str, new: &str) -> Vec<(String, String, String)> {
    fn flatten(
        prefix: &str,
        v: &toml::Value,
        out: &mut std::collections::BTreeMap<String, String>,
    ) {
        match v {
            toml::Value::Table(t) => t.iter().for_each(|(k, v)| {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out)
            }),
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let flat = |text: &str| {
        let mut out = std::collections::BTreeMap::new();
        if let Ok(t) = text.parse::<toml::Table>() {
            flatten("", &toml::Value::Table(t), &mut out);
        }
        out
    };
    let (a, b) = (flat(old), flat(new));
    if a.is_empty() {
        return Vec::new();
    }
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let shown = |v: Option<&String>| v.cloned().unwrap_or_else(|| "-".into());
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| (k.clone(), shown(a.get(k)), shown(b.get(k))))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn differences_are_dotted_keys_with_both_values() {
        let old = "[train]\nbatch_size = 8\nbeta = 0.1\n[train.lora]\nr = 0\n";
        let new = "[train]\nbatch_size = 4\nbeta = 0.1\nseed = 7\n[train.lora]\nr = 16\n";
        assert_eq!(
            super::differences(old, new),
            [
                ("train.batch_size".into(), "8".into(), "4".into()),
                ("train.lora.r".into(), "0".into(), "16".into()),
                ("train.seed".into(), "-".into(), "7".into()),
            ]
        );
        assert!(super::differences("not toml [", new).is_empty());
    }

    /// More TOML after a newline in a `--set` value is not silently dropped: the whole text is
    /// one string, which a numeric key refuses (fuzzer).
    #[test]
    fn a_set_value_with_more_toml_is_one_string() {
        assert_eq!(super::parse_value("4"), toml::Value::Integer(4));
        assert_eq!(
            super::parse_value("4\nprecompute.chunk_pairs = 3"),
            toml::Value::String("4\nprecompute.chunk_pairs = 3".into())
        );
        assert_eq!(super::parse_value("abc"), toml::Value::String("abc".into()));
    }
}

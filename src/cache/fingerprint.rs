//! The cache fingerprint: what a cache was computed from, so stage two can refuse a stale one.

use crate::config::{Columns, Dtype, MessageKeys, Role, Shard, Truncation};
use crate::error::{fs, Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub dataset_id: String,
    pub dataset_revision: String,
    pub split: String,
    /// `dataset.limit` (0 = all rows).
    pub limit: usize,
    /// `data_files`, `test_size` and the mappings; `None` for the defaults (on disk: the options
    /// as a JSON string, empty for the defaults, as caches made before these keys existed hold).
    #[serde(default, with = "options_as_json_string")]
    pub dataset_options: Option<DatasetOptions>,
    pub model_id: String,
    pub model_revision: String,
    /// SHA-256 of the model's safetensors files.
    pub weights_sha256: String,
    /// SHA-256 of `tokenizer.json`.
    pub tokenizer_sha256: String,
    pub chat_template_sha256: String,
    /// SHA-256 of the model's `config.json`: its RoPE, norms, windows and soft caps shape the
    /// reference's log-probs ("" in caches made before it was recorded, which are then stale).
    #[serde(default)]
    pub model_config_sha256: String,
    /// SHA-256 over `tokenizer_config.json` and `special_tokens_map.json` (those present, each
    /// as its name, a NUL byte and its bytes): the EOS appended to plain answers, the BOS added.
    #[serde(default)]
    pub tokenizer_config_sha256: String,
    pub max_length: usize,
    pub truncation: Truncation,
    /// The shard a shard's files hold ("i/n" on disk); `None` for a whole split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<Shard>,
    /// The split's pairs a shard's files hold, as indices among all its kept pairs:
    /// `"start..end of n"` on disk (`None` for a whole split, and in shards made before it was
    /// recorded).
    /// A split's shards must tile `0..n` ([`super::shards`] checks it): shards scored under
    /// different `precompute.chunk_pairs` would otherwise read as a split with pairs missing or
    /// repeated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_pairs: Option<super::shards::ShardPairs>,
    /// The reference forward's compute dtype: a training run in another dtype is refused (its
    /// policy would not start as the reference, so the first loss would not be ln 2).
    pub dtype: Dtype,
    pub refdpo_version: String,
    /// The version of stage one's numerics that scored the cache ([`SCORING`]; 0 in caches
    /// made before it was recorded). Another version is scored again by `precompute`; stage two
    /// says so, since its policy may not start exactly as that reference.
    #[serde(default)]
    pub scoring: u32,
    /// SHA-256 of every data file the split was read from, by its path relative to the dataset
    /// directory (the file's folder for a one-file dataset): an edited file is another cache.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub data_sha256: BTreeMap<String, String>,
    /// The hub commit `dataset_revision` resolved to; empty for local data.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dataset_commit: String,
    /// The hub commit `model_revision` resolved to; empty for a local model (informational:
    /// the weights, tokenizer and template hashes bind a run).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model_commit: String,
}

/// What else decides a split's rows besides the dataset id, revision, split and limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetOptions {
    pub data_files: BTreeMap<String, String>,
    pub test_size: f64,
    pub columns: Columns,
    pub message_keys: MessageKeys,
    pub roles: BTreeMap<String, Role>,
}

/// [`DatasetOptions`] inside the fingerprint: one JSON string, `""` for none.
mod options_as_json_string {
    use super::DatasetOptions;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<DatasetOptions>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            None => s.serialize_str(""),
            Some(o) => {
                s.serialize_str(&serde_json::to_string(o).map_err(serde::ser::Error::custom)?)
            }
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<DatasetOptions>, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(None);
        }
        serde_json::from_str(&text)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

/// The version of stage one's numerics (the forward and log-probs that fill a cache), recorded
/// in each cache's fingerprint. Bump it with any change that moves cached reference log-probs
/// (beyond a test's tolerance, on any device), so that an up-to-date check scores caches made by
/// the older numerics again instead of keeping them.
///
/// 1: on the CPU, every dtype computes in f32 over the weights rounded to it (before: bf16 and
/// f16 computed in their own dtype).
/// 2: config.json read as transformers reads it (family defaults for absent keys, RoPE
/// precedence, linear RoPE scaling); chat templates given a row's `tools`,
/// `chat_template_kwargs` and every message key; tokenizers built as transformers' class for
/// them builds them (LlamaTokenizer's and GemmaTokenizer's pipelines, the class `config.json`'s
/// `model_type` picks): models, tokenizers and rows that use them scored anew.
/// 3: chat templates read as Jinja2 reads them (Windows line ends as `\n`; Python's whitespace
/// in `trim`, `strip()`, `split()`; `tojson` floats as Python's `repr`), and after an explicit
/// prompt an answer of several turns kept as the completion (a `prompt_mismatch` skip before).
/// 4: tokenizers built as transformers 5.24 builds them for more inputs: every named special
/// token added at load (matched whole), a model's own `*_token` keys and `extra_special_tokens`
/// given to the template, GPT2's and Qwen2's BPE without the file's `unk_token` and
/// `ignore_merges`; a null `content` no key to the template.
/// 5: chat templates print lists, dicts and floats as Jinja2 does (Python's `repr`), `indent`,
/// `int`, `float`, `//`, `%` and string formatting as Jinja2's, a division by zero fails, the
/// Python string methods and Jinja2 filters minijinja lacks are refdpo's; a `content` list of
/// parts reaches the template (a `wrong_type` skip before); a named special token in the
/// vocabulary only is added with the config's `lstrip`, `rstrip` and `single_word`.
pub const SCORING: u32 = 5;

/// What stage one alone can know, having read the data: a run that reads no dataset does not
/// compare these, and checks local data files with [`Fingerprint::check_data`] instead.
pub const READ_BY_STAGE_ONE: [&str; 3] = ["data_sha256", "dataset_commit", "model_commit"];

impl Fingerprint {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("fingerprint serializes")
    }

    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::StaleCache {
            path: path.to_path_buf(),
            msg: format!("unreadable fingerprint ({e}): re-run `refdpo precompute`"),
        })
    }

    /// The first field (in declaration order) whose value differs from `other`'s, with both
    /// values as JSON; fields named in `skip` are not compared.
    pub fn first_difference(
        &self,
        other: &Fingerprint,
        skip: &[&str],
    ) -> Option<(String, String, String)> {
        let (serde_json::Value::Object(a), serde_json::Value::Object(b)) = (
            serde_json::to_value(self).expect("fingerprint serializes"),
            serde_json::to_value(other).expect("fingerprint serializes"),
        ) else {
            unreachable!("a fingerprint serializes to an object")
        };
        a.into_iter()
            .filter(|(k, _)| !skip.contains(&k.as_str()))
            .find(|(k, v)| b.get(k) != Some(v))
            .map(|(k, v)| {
                let theirs = b.get(&k).map(ToString::to_string).unwrap_or_default();
                (k, v.to_string(), theirs)
            })
    }

    /// Everything a training run depends on — the dataset rows, the model, the tokenizer, the
    /// tokenization and the compute dtype (not the refdpo version or numerics that wrote it: see
    /// [`Fingerprint::scoring`]).
    /// The first field that differs is named with both values.
    pub fn check_compatible(&self, expected: &Fingerprint, path: &Path) -> Result<()> {
        // (a split's shards are checked against each other: `shards::check_tiling`)
        let mut skip = vec!["refdpo_version", "scoring", "shard_pairs"];
        skip.extend(READ_BY_STAGE_ONE);
        match self.first_difference(expected, &skip) {
            Some((name, cached, wanted)) => Err(stale(path, &name, &cached, &wanted)),
            None => Ok(()),
        }
    }

    /// A cache read for a config (`stats --config`) whose fingerprint differs from what the
    /// config declares (`inputs::declared`: the cache's own with those fields set) is
    /// another cache: refused naming the first field, as stage two refuses it.
    pub fn check_declared(&self, declared: &Fingerprint, path: &Path) -> Result<()> {
        match self.first_difference(declared, &[]) {
            Some((field, cached, wanted)) => Err(Error::StaleCache {
                path: path.to_path_buf(),
                msg: format!(
                    "fingerprint field `{field}` is {cached} in the cache but {wanted} for this \
                     config: it was made from other inputs. Re-run `refdpo precompute` with \
                     this config, or name the cache with --cache"
                ),
            }),
            None => Ok(()),
        }
    }

    /// The local data files this cache was made from, where they still exist: each must hash as
    /// it did, or the cache holds other rows' log-probs (refused, naming the file). A file that
    /// is gone is not an error: a cache outlives the data it was made from.
    pub fn check_data(&self, cache: &Path) -> Result<()> {
        let id = Path::new(&self.dataset_id);
        let dir: PathBuf = if id.is_file() {
            id.parent().map(Path::to_path_buf).unwrap_or_default()
        } else if id.is_dir() {
            id.to_path_buf()
        } else {
            return Ok(()); // a hub dataset: its files are pinned by `dataset_commit`
        };
        for (rel, sha) in &self.data_sha256 {
            let file = dir.join(rel);
            if !file.is_file() {
                continue;
            }
            if fs::sha256(&file)? != *sha {
                return Err(Error::StaleCache {
                    path: cache.to_path_buf(),
                    msg: format!(
                        "made from `{}` as it was before an edit (its SHA-256 differs from the \
                         one the cache recorded): re-run `refdpo precompute` to score the \
                         edited data",
                        file.display()
                    ),
                });
            }
        }
        Ok(())
    }
}

fn stale(path: &Path, field: &str, cached: &str, wanted: &str) -> Error {
    // default dataset options are recorded as nothing (a cache of defaults keeps its old bytes)
    let defaults =
        "the defaults (`data_files`, `test_size`, `columns`, `message_keys` and `roles` unset)";
    let cached = match (field, cached) {
        ("dataset_options", "\"\"") => defaults,
        (_, "\"\"") => "not recorded (the cache predates the field)",
        (_, other) => other,
    };
    let wanted = match (field, wanted) {
        ("dataset_options", "\"\"") => defaults,
        (_, other) => other,
    };
    Error::StaleCache {
        path: path.to_path_buf(),
        msg: format!(
            "fingerprint field `{field}` is {cached} in the cache but {wanted} for this config; \
             re-run `refdpo precompute` with this config (or point `train.cache` at the matching cache)"
        ),
    }
}

#[cfg(test)]
pub(crate) fn sample() -> Fingerprint {
    Fingerprint {
        dataset_id: "d".into(),
        dataset_revision: "main".into(),
        split: "train_prefs".into(),
        limit: 0,
        dataset_options: None,
        model_id: "m".into(),
        model_revision: "main".into(),
        weights_sha256: "w".into(),
        tokenizer_sha256: "t".into(),
        chat_template_sha256: "c".into(),
        model_config_sha256: "mc".into(),
        tokenizer_config_sha256: "tc".into(),
        max_length: 1024,
        truncation: Truncation::KeepStart,
        shard: None,
        dtype: Dtype::F32,
        refdpo_version: "0.1.0".into(),
        scoring: SCORING,
        data_sha256: BTreeMap::new(),
        dataset_commit: String::new(),
        model_commit: String::new(),
        shard_pairs: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatch_names_the_field() {
        let a = sample();
        let mut b = sample();
        b.max_length = 512;
        let err = a
            .check_compatible(&b, Path::new("c.arrow"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`max_length`") && err.contains("1024") && err.contains("512"),
            "{err}"
        );
        let mut b = sample();
        b.weights_sha256 = "other".into();
        let err = a
            .check_compatible(&b, Path::new("c.arrow"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("weights_sha256"), "{err}");
        for (field, b) in [
            (
                "dataset_id",
                Fingerprint {
                    dataset_id: "e".into(),
                    ..sample()
                },
            ),
            (
                "dataset_revision",
                Fingerprint {
                    dataset_revision: "v2".into(),
                    ..sample()
                },
            ),
            (
                "limit",
                Fingerprint {
                    limit: 64,
                    ..sample()
                },
            ),
            (
                "dtype",
                Fingerprint {
                    dtype: Dtype::Bf16,
                    ..sample()
                },
            ),
        ] {
            let err = a
                .check_compatible(&b, Path::new("c.arrow"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("`{field}`")), "{err}");
        }
        let mut b = sample();
        b.refdpo_version = "0.0.1".into(); // another build's cache of the same inputs trains
        a.check_compatible(&b, Path::new("c.arrow")).unwrap();
    }

    #[test]
    fn an_edited_data_file_is_named_and_a_missing_one_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pairs.jsonl");
        std::fs::write(&file, "{}\n").unwrap();
        let mut fp = Fingerprint {
            dataset_id: file.to_string_lossy().into(),
            ..sample()
        };
        fp.data_sha256
            .insert("pairs.jsonl".into(), fs::sha256(&file).unwrap());
        fp.data_sha256.insert("gone.jsonl".into(), "0".into());
        fp.check_data(Path::new("c.arrow")).unwrap();
        std::fs::write(&file, "{} \n").unwrap();
        let err = fp.check_data(Path::new("c.arrow")).unwrap_err().to_string();
        assert!(
            err.contains("pairs.jsonl") && err.contains("before an edit"),
            "{err}"
        );
        // stage two does not compare what only stage one reads
        let mut other = fp.clone();
        other.data_sha256.clear();
        other.dataset_commit = "abc".into();
        fp.check_compatible(&other, Path::new("c.arrow")).unwrap();
    }

    #[test]
    fn typed_fields_keep_their_on_disk_form() {
        let mut fp = sample();
        let json = fp.to_json();
        assert!(
            json.contains(r#""dataset_options":"""#) && !json.contains("shard"),
            "{json}"
        );
        fp.shard = Some(Shard { index: 1, count: 4 });
        fp.dataset_options = Some(DatasetOptions {
            data_files: [("train_prefs".to_string(), "a.jsonl".to_string())].into(),
            test_size: 0.05,
            columns: Columns::default(),
            message_keys: MessageKeys::default(),
            roles: BTreeMap::new(),
        });
        let json = fp.to_json();
        assert!(json.contains(r#""shard":"1/4""#), "{json}");
        assert!(
            json.contains(r#""dataset_options":"{\"data_files\":{\"train_prefs\":\"a.jsonl\"},\"test_size\":0.05,"#),
            "{json}"
        );
        assert_eq!(Fingerprint::from_json(&json, Path::new("x")).unwrap(), fp);
    }

    /// Default dataset options are recorded as nothing: a cache of them is not one that
    /// "predates the field" (fuzzer: said of a cache written a moment before).
    #[test]
    fn default_dataset_options_are_named_as_defaults() {
        let cached = sample();
        let mut wanted = sample();
        wanted.dataset_options = Some(DatasetOptions {
            data_files: BTreeMap::new(),
            test_size: 0.0,
            columns: Columns::default(),
            message_keys: MessageKeys::default(),
            roles: [("human".to_string(), crate::config::Role::User)].into(),
        });
        for (a, b) in [(&cached, &wanted), (&wanted, &cached)] {
            let err = a
                .check_compatible(b, Path::new("c.arrow"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("`dataset_options`")
                    && err.contains("the defaults (`data_files`")
                    && !err.contains("predates"),
                "{err}"
            );
        }
    }

    #[test]
    fn json_round_trip() {
        let a = sample();
        assert_eq!(
            Fingerprint::from_json(&a.to_json(), Path::new("x")).unwrap(),
            a
        );
    }
}

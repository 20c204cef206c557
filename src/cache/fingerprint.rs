//! The cache fingerprint: what a cache was computed from, so stage two can refuse a stale one.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub dataset_id: String,
    pub dataset_revision: String,
    pub split: String,
    /// `dataset.limit` (0 = all rows).
    pub limit: usize,
    pub model_id: String,
    pub model_revision: String,
    /// SHA-256 of the model's safetensors files.
    pub weights_sha256: String,
    /// SHA-256 of `tokenizer.json`.
    pub tokenizer_sha256: String,
    pub chat_template_sha256: String,
    pub max_length: usize,
    pub truncation: String,
    pub dtype: String,
    pub refdpo_version: String,
}

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

    /// Fields a training run depends on: the model, tokenizer and tokenization. The first that
    /// differs is named with both values.
    pub fn check_compatible(&self, expected: &Fingerprint, path: &Path) -> Result<()> {
        let fields: [(&str, &str, &str); 7] = [
            ("model_id", &self.model_id, &expected.model_id),
            (
                "model_revision",
                &self.model_revision,
                &expected.model_revision,
            ),
            (
                "weights_sha256",
                &self.weights_sha256,
                &expected.weights_sha256,
            ),
            (
                "tokenizer_sha256",
                &self.tokenizer_sha256,
                &expected.tokenizer_sha256,
            ),
            (
                "chat_template_sha256",
                &self.chat_template_sha256,
                &expected.chat_template_sha256,
            ),
            ("truncation", &self.truncation, &expected.truncation),
            ("split", &self.split, &expected.split),
        ];
        for (name, cached, wanted) in fields {
            if cached != wanted {
                return Err(stale(path, name, cached, wanted));
            }
        }
        if self.max_length != expected.max_length {
            return Err(stale(
                path,
                "max_length",
                &self.max_length.to_string(),
                &expected.max_length.to_string(),
            ));
        }
        Ok(())
    }
}

fn stale(path: &Path, field: &str, cached: &str, wanted: &str) -> Error {
    Error::StaleCache {
        path: path.to_path_buf(),
        msg: format!(
            "fingerprint field `{field}` is {cached:?} in the cache but {wanted:?} for this config; \
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
        model_id: "m".into(),
        model_revision: "main".into(),
        weights_sha256: "w".into(),
        tokenizer_sha256: "t".into(),
        chat_template_sha256: "c".into(),
        max_length: 1024,
        truncation: "keep_start".into(),
        dtype: "f32".into(),
        refdpo_version: "0.1.0".into(),
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
        let mut b = sample();
        b.dtype = "bf16".into(); // the reference dtype does not bind training
        a.check_compatible(&b, Path::new("c.arrow")).unwrap();
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

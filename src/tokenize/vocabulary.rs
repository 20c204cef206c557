//! Whether a tokenizer belongs to a model: every id it can produce indexes a row of the model's
//! embedding.

use super::PairTokenizer;
use crate::error::{Error, Result};
use std::path::Path;

impl PairTokenizer {
    /// Every id the tokenizer can produce indexes a row of the model's embedding (`vocab_size`
    /// rows, the model in `dir`): a tokenizer from another model would otherwise fail deep
    /// inside the embedding lookup (or, on a GPU, read past it).
    pub fn check_vocabulary(&self, dir: &Path, vocab_size: usize) -> Result<()> {
        let vocab = self.tokenizer.get_vocab(true);
        let post = self
            .tokenizer
            .get_post_processor()
            .and_then(|p| serde_json::to_value(p).ok())
            .map(|v| post_processor_ids(&v))
            .unwrap_or_default();
        let Some((token, id)) = vocab
            .iter()
            .map(|(t, &id)| (t.clone(), id))
            .chain(
                post.into_iter()
                    .map(|id| ("added by its post_processor".into(), id)),
            )
            .max_by_key(|(_, id)| *id)
        else {
            return Ok(());
        };
        if id as usize >= vocab_size {
            return Err(Error::Model(format!(
            "`{}`: the tokenizer's largest id is {id} ({token:?}), but the model's embedding has \
             {vocab_size} rows (`vocab_size` in `{}`): the tokenizer belongs to another model \
             (use the model's own tokenizer.json)",
            dir.join("tokenizer.json").display(),
            dir.join("config.json").display(),
        )));
        }
        Ok(())
    }
}

/// The ids a tokenizer's post-processor adds (`TemplateProcessing`'s `special_tokens[*].ids`,
/// BERT/RoBERTa's `cls` and `sep`), whatever its JSON nests them in.
fn post_processor_ids(v: &serde_json::Value) -> Vec<u32> {
    use serde_json::Value;
    let ids = |v: &Value| -> Vec<u32> {
        let items = match v {
            Value::Array(a) => a.clone(),
            other => vec![other.clone()],
        };
        items
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| u32::try_from(x).unwrap_or(u32::MAX))
            .collect()
    };
    match v {
        Value::Object(o) => o
            .iter()
            .flat_map(|(k, v)| match k.as_str() {
                "ids" | "cls" | "sep" => ids(v),
                _ => post_processor_ids(v),
            })
            .collect(),
        Value::Array(a) => a.iter().flat_map(post_processor_ids).collect(),
        _ => Vec::new(),
    }
}

//! One split of the stage-one cache as training reads it: memory-mapped, and checked against the
//! run (checksum, fingerprint, token ids inside the model's vocabulary, each pair's sequences
//! non-empty and its reference log-probs finite sums at most 0) before any step, with the
//! per-pair sequence lengths used for bucketing.

use crate::cache::{self, checksum, CacheBatch, Fingerprint, MappedCache};
use crate::error::{Error, Result};
use std::path::Path;

pub struct Split {
    pub cache: MappedCache,
    /// Prompt + the longer completion, per pair.
    pub lengths: Vec<usize>,
}

impl Split {
    /// Opens `<dir>/<split>.arrow` for a model with `vocab_size` token ids.
    pub fn open(
        dir: &Path,
        split: &str,
        expected: &Fingerprint,
        vocab_size: usize,
    ) -> Result<Self> {
        let path = cache::arrow_path(dir, split);
        // the whole split's file, or all of its shards
        let Some(cache) = cache::shards::open(dir, split, expected)? else {
            return Err(Error::MissingCache {
                path,
                msg: format!(
                    "run `refdpo precompute` with this config first{}",
                    cache::shards::held_splits_note(dir)
                ),
            });
        };
        cache.fingerprint.check_data(&path)?;
        if let Some(max) = cache.max_token_id().filter(|&m| m as usize >= vocab_size) {
            return Err(checksum::corrupt(
                &path,
                format!("token id {max} is outside the model's vocabulary of {vocab_size}"),
            ));
        }
        let window = (cache.fingerprint.max_length, cache.fingerprint.truncation);
        let mut lengths = Vec::with_capacity(cache.len());
        for i in 0..cache.len() {
            let (b, r) = cache.locate(i);
            let (prompt, chosen, rejected) = (
                b.prompt_ids(r).len(),
                b.chosen_ids(r).len(),
                b.rejected_ids(r).len(),
            );
            let bad = cache::impossible_pair(
                [prompt, chosen, rejected],
                [b.ref_chosen(r), b.ref_rejected(r)],
                window,
            );
            if let Some(what) = bad {
                return Err(checksum::corrupt(&path, format!("pair {i} has {what}")));
            }
            lengths.push(prompt + chosen.max(rejected));
        }
        Ok(Self { cache, lengths })
    }

    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// The batch and in-batch row of pair `i`.
    pub fn pair(&self, i: usize) -> (&CacheBatch, usize) {
        self.cache.locate(i)
    }
}

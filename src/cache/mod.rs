//! The cache stage: schema (one definition), fingerprint, Parquet and Arrow IPC readers/writers.

pub mod checksum;
pub mod fingerprint;
pub mod ipc;
pub mod parquet;
pub mod report;
pub mod schema;
pub mod shards;

pub use fingerprint::Fingerprint;
pub use ipc::MappedCache;
pub use schema::{CacheBatch, CacheRow};

use crate::config::Truncation;
use crate::dirs::CacheDir;
use std::path::{Path, PathBuf};

/// The largest reference log-probability sum a pair may have: 0, with room for rounding (a GPU's
/// fast `log` may put a near-certain token's log-prob a few 1e-7 above 0; 1e-2 allows for tens
/// of thousands of them).
pub const MAX_REF_LOGP: f64 = 1e-2;

/// The lowest mean reference log-probability per completion token a pair may have: a token's
/// probability e^-10000. A uniform guess over a 256k vocabulary is -12.5 per token; no model's
/// forward gets near this, while a sum like -1e308 (a hand-edited cache) trained nothing: every
/// reward saturated the loss at 0 and the gradient with it.
pub const MIN_REF_LOGP_PER_TOKEN: f64 = -1e4;

/// Whether `logp` is a possible reference log-prob sum over `tokens` completion tokens: finite,
/// at most 0 ([`MAX_REF_LOGP`]) and at least [`MIN_REF_LOGP_PER_TOKEN`] per token.
pub fn possible_ref_logp(logp: f64, tokens: usize) -> bool {
    logp.is_finite() && logp <= MAX_REF_LOGP && logp >= MIN_REF_LOGP_PER_TOKEN * tokens as f64
}

/// What makes a cached pair impossible (None: nothing): an empty sequence, answers longer than
/// the cache's truncation keeps (its `max_length` and mode), or reference log-probs that are not
/// possible sums ([`possible_ref_logp`]). Every reader of a cache checks
/// each pair with it (training, `stats`), so a hand-edited or foreign file is refused by pair,
/// not read around.
pub fn impossible_pair(
    lens: [usize; 3],
    refs: [f64; 2],
    (max_length, truncation): (usize, Truncation),
) -> Option<String> {
    let [prompt, chosen, rejected] = lens;
    if prompt == 0 || chosen == 0 || rejected == 0 {
        return Some(format!(
            "an empty sequence ({prompt} prompt, {chosen} chosen, {rejected} rejected ids)"
        ));
    }
    // what stage one's truncation keeps of an answer (`tokenize::pairs::kept_completion`): a
    // longer one would be cut again by training's window, its reference sum over other tokens
    let room = match truncation {
        Truncation::KeepStart => max_length.saturating_sub(prompt),
        Truncation::KeepEnd => max_length,
    };
    if chosen.max(rejected) > room {
        return Some(format!(
            "answers of {chosen} and {rejected} ids after a {prompt}-id prompt, more than \
             `max_length` {max_length} keeps ({})",
            truncation.as_str()
        ));
    }
    (!(possible_ref_logp(refs[0], chosen) && possible_ref_logp(refs[1], rejected))).then(|| {
        format!(
            "reference log-probs {refs:?} over {chosen} and {rejected} completion tokens, not \
             finite sums between {MIN_REF_LOGP_PER_TOKEN} per token and 0"
        )
    })
}

/// `<dir>/<split>.parquet` ([`CacheDir::parquet`]).
pub fn parquet_path(dir: &Path, split: &str) -> PathBuf {
    CacheDir::new(dir).parquet(split)
}

/// `<dir>/<split>.arrow` ([`CacheDir::arrow`]).
pub fn arrow_path(dir: &Path, split: &str) -> PathBuf {
    CacheDir::new(dir).arrow(split)
}

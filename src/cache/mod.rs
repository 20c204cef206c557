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

use crate::dirs::CacheDir;
use std::path::{Path, PathBuf};

/// The largest reference log-probability sum a pair may have: 0, with room for rounding (a GPU's
/// fast `log` may put a near-certain token's log-prob a few 1e-7 above 0; 1e-2 allows for tens
/// of thousands of them).
pub const MAX_REF_LOGP: f64 = 1e-2;

/// What makes a cached pair impossible (None: nothing): an empty sequence, or reference
/// log-probs that are not finite sums at most 0. Every reader of a cache checks each pair with
/// it (training, `stats`), so a hand-edited or foreign file is refused by pair, not read around.
pub fn impossible_pair(lens: [usize; 3], refs: [f64; 2]) -> Option<String> {
    let [prompt, chosen, rejected] = lens;
    if prompt == 0 || chosen == 0 || rejected == 0 {
        return Some(format!(
            "an empty sequence ({prompt} prompt, {chosen} chosen, {rejected} rejected ids)"
        ));
    }
    refs.iter()
        .any(|l| !(l.is_finite() && *l <= MAX_REF_LOGP))
        .then(|| format!("reference log-probs {refs:?}, not finite sums at most 0"))
}

/// `<dir>/<split>.parquet` ([`CacheDir::parquet`]).
pub fn parquet_path(dir: &Path, split: &str) -> PathBuf {
    CacheDir::new(dir).parquet(split)
}

/// `<dir>/<split>.arrow` ([`CacheDir::arrow`]).
pub fn arrow_path(dir: &Path, split: &str) -> PathBuf {
    CacheDir::new(dir).arrow(split)
}

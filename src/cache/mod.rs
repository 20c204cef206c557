//! The cache stage: schema (one definition), fingerprint, Parquet and Arrow IPC readers/writers.

pub mod checksum;
pub mod fingerprint;
pub mod ipc;
pub mod parquet;
pub mod schema;
pub mod shards;

pub use fingerprint::Fingerprint;
pub use ipc::MappedCache;
pub use schema::{CacheBatch, CacheRow};

use std::path::{Path, PathBuf};

/// `<dir>/<split>.parquet`
pub fn parquet_path(dir: &Path, split: &str) -> PathBuf {
    dir.join(format!("{split}.parquet"))
}

/// `<dir>/<split>.arrow`
pub fn arrow_path(dir: &Path, split: &str) -> PathBuf {
    dir.join(format!("{split}.arrow"))
}

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

/// `<dir>/<split>.parquet` ([`CacheDir::parquet`]).
pub fn parquet_path(dir: &Path, split: &str) -> PathBuf {
    CacheDir::new(dir).parquet(split)
}

/// `<dir>/<split>.arrow` ([`CacheDir::arrow`]).
pub fn arrow_path(dir: &Path, split: &str) -> PathBuf {
    CacheDir::new(dir).arrow(split)
}

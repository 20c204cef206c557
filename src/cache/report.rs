//! `report.json` (or a shard's `report.shard-<i>-of-<n>.json`): one entry per split, the one
//! definition stage one writes and `stats` reads.

use crate::error::{fs, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A row stage one did not keep (the first ones of a split are listed).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SkippedRow {
    pub row: u64,
    /// 1-based line of a JSON Lines file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    pub reason: String,
    /// The template's or tokenizer's own message, where one failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// One split's entry (field order is the file's key order). A key an older refdpo did not
/// write reads as its default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SplitReport {
    pub rows_read: usize,
    pub rows_kept: usize,
    /// Skips by reason.
    pub dropped: BTreeMap<String, usize>,
    /// The first skipped rows, with line numbers and messages where the source has them.
    pub skipped_rows: Vec<SkippedRow>,
    pub tokens: usize,
    pub seconds: f64,
    pub tokens_per_second: f64,
    /// The reference forward + log-probs alone (0 when the cache was up to date).
    pub score_seconds: f64,
    pub resumed_chunks: usize,
    pub up_to_date: bool,
    pub parquet: PathBuf,
    pub arrow: PathBuf,
}

/// Every split's entry of a report file.
pub type Report = BTreeMap<String, SplitReport>;

/// Reads a report file.
pub fn read(path: &Path) -> Result<Report> {
    fs::read_json(path)
}

/// Merges one split's entry into the report file (atomically); other splits' entries stay.
pub fn update(path: &Path, split: &str, entry: &SplitReport) -> Result<()> {
    let mut all: BTreeMap<String, serde_json::Value> = match crate::error::fs::read_to_string(path)
    {
        Ok(text) => serde_json::from_str(&text).unwrap_or_default(),
        Err(_) => BTreeMap::new(),
    };
    all.insert(split.to_string(), serde_json::to_value(entry)?);
    fs::write_atomic(path, serde_json::to_string_pretty(&all)?.as_bytes())
}

//! `report.json`: one typed entry per split, merged into the file atomically, and the line per
//! split the terminal shows.

use crate::data::Skipped;
use crate::error::{fs, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One split's entry of `report.json` (field order is the file's key order).
#[derive(Debug, Clone, Serialize)]
pub struct SplitReport {
    pub rows_read: usize,
    pub rows_kept: usize,
    /// Skips by reason.
    pub dropped: BTreeMap<String, usize>,
    /// The first skipped rows, with line numbers and messages where the source has them.
    pub skipped_rows: Vec<Skipped>,
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

/// A split's name and its entry.
pub struct Report {
    pub split: String,
    pub entry: SplitReport,
}

/// One line a split for the terminal: counts, skips by reason, throughput, files.
pub fn describe(r: &Report) -> String {
    let e = &r.entry;
    let skipped: Vec<String> = e.dropped.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let done = if e.up_to_date {
        "cache was up to date".to_string()
    } else {
        let resumed = match e.resumed_chunks {
            0 => String::new(),
            k => format!(", resumed {k} finished chunks"),
        };
        format!(
            "scored in {:.1} s, {:.0} tokens/s{resumed}",
            e.seconds, e.tokens_per_second
        )
    };
    let skipped = if skipped.is_empty() {
        String::new()
    } else {
        format!(" ({})", skipped.join(", "))
    };
    format!(
        "{}: {} rows read, {} kept, {} skipped{skipped}; {} tokens ({done}) -> {}, {}",
        r.split,
        e.rows_read,
        e.rows_kept,
        e.rows_read - e.rows_kept,
        e.tokens,
        e.parquet.display(),
        e.arrow.display(),
    )
}

/// Merges one split's entry into `report.json` (atomically); entries of other splits stay.
pub fn update_report(path: &Path, report: &Report) -> Result<()> {
    let mut all: BTreeMap<String, serde_json::Value> = match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).unwrap_or_default(),
        Err(_) => BTreeMap::new(),
    };
    all.insert(report.split.clone(), serde_json::to_value(&report.entry)?);
    fs::write_atomic(path, serde_json::to_string_pretty(&all)?.as_bytes())
}

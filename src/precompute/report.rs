//! `report.json`: one typed entry per split, merged into the file atomically, and the line per
//! split the terminal shows.

use crate::cache::report::SkippedRow;
pub use crate::cache::report::SplitReport;
use crate::data::Skipped;
use crate::error::Result;
use std::path::Path;

/// A skipped row as the report lists it.
pub fn listed(s: &Skipped) -> SkippedRow {
    SkippedRow {
        row: s.row,
        line: s.line,
        reason: s.reason.to_string(),
        detail: s.detail.clone(),
    }
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
    crate::cache::report::update(path, &report.split, &report.entry)
}

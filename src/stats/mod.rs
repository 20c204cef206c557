//! `refdpo stats`: pair statistics and length bias over a cache, computed with polars LazyFrame
//! queries; tables on stdout, `--json`, `--plot DIR` (SVG charts), and with `--run DIR` the trained
//! policy's implicit reward margin against the length difference on the chosen split.

pub mod plot;
pub mod policy;
pub mod queries;

use crate::cache;
use crate::config::Config;
use crate::error::{Error, Result};
use candle_core::Device;
use queries::{Stats, Table};
use std::fmt::Write;
use std::path::{Path, PathBuf};

pub struct StatsOptions {
    /// A cache directory or one `<split>.parquet`.
    pub cache: PathBuf,
    pub split: Option<String>,
    pub run: Option<PathBuf>,
    pub json: bool,
    pub plot: Option<PathBuf>,
    pub config: Option<Config>,
    /// Whether `config` chose the cache (`--config` without `--cache`): the cache must then be
    /// of the inputs it declares.
    pub cache_of_config: bool,
    pub device: Device,
}

/// The split to analyse and its parquet files: the file given, or `<dir>/<split>.parquet`, or
/// all of that split's shards.
fn resolve_parquet(opts: &StatsOptions) -> Result<(String, Vec<PathBuf>)> {
    if opts.cache.is_file() {
        if opts.cache.extension().is_some_and(|e| e != "parquet") {
            return Err(Error::Config(format!(
                "`{}` is not a split's `.parquet`: stats reads the Parquet file; pass it, or the \
                 cache directory with --split",
                opts.cache.display()
            )));
        }
        let split = opts
            .cache
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        // `<split>.parquet` or a shard's `<split>.shard-K-of-N.parquet`
        let named = split.split(".shard-").next().unwrap_or_default();
        if let Some(other) = opts.split.as_deref().filter(|&s| s != named) {
            return Err(Error::Config(format!(
                "--split {other} names another split than `{}` ({named}): pass the cache \
                 directory with --split {other}, or that split's own file",
                opts.cache.display()
            )));
        }
        return Ok((split.to_string(), vec![opts.cache.clone()]));
    }
    let split = opts
        .split
        .clone()
        .or_else(|| opts.config.as_ref().map(|c| c.dataset.train_split.clone()))
        .unwrap_or_else(|| "train_prefs".into());
    match cache::shards::files(&opts.cache, &split, "parquet")? {
        Some(files) => {
            cache::shards::check_parquet(&files, &split)?;
            Ok((split, files))
        }
        None => {
            let splits = cache::shards::held_splits_note(&opts.cache);
            Err(Error::MissingCache {
                path: cache::parquet_path(&opts.cache, &split),
                msg: format!(
                    "pass --cache DIR (with --split NAME{splits}) or a .parquet file, or run \
                     `refdpo precompute`"
                ),
            })
        }
    }
}

/// The reports beside a split's files: `report.json`, or each shard's `report.shard-*.json`.
fn reports(files: &[PathBuf], split: &str) -> Vec<PathBuf> {
    files
        .iter()
        .map(|f| crate::dirs::CacheDir::report_beside(f, split))
        .collect()
}

pub fn run(opts: &StatsOptions) -> Result<String> {
    let (split, files) = resolve_parquet(opts)?;
    for f in &files {
        cache::parquet::verify(f)?;
    }
    if let (Some(cfg), true, Some(first)) = (&opts.config, opts.cache_of_config, files.first()) {
        let cached = cache::parquet::read_fingerprint(first)?;
        cached.check_declared(&crate::inputs::declared(cfg, &cached), first)?;
    }
    // polars panics on some damaged footers the checksum (over the bytes before them) passes
    let first = files.first().map(PathBuf::as_path).unwrap_or(Path::new(""));
    let mut stats = crate::error::contain_panic(first, "reading the parquet cache", || {
        queries::check_pairs(&files)?;
        queries::compute(&files)
    })?;
    stats.add_dropped(&reports(&files, &split), &split);
    if let Some(run_dir) = &opts.run {
        let policy = policy::policy_bias(run_dir, &split, &files, &opts.device)?;
        stats.policy = Some(policy);
        let generations = crate::dirs::RunDir::new(run_dir).generations(&split);
        if generations.exists() {
            let lines: Vec<_> = crate::generate::line::read_lines(&generations)?
                .into_iter()
                .map(|(_, l)| l)
                .collect();
            let run = crate::dirs::RunDir::new(run_dir);
            match crate::generate::line::check_current(&run, &generations, &lines) {
                Ok(()) => {
                    stats.generations = Some(crate::generate::Summary::of_read(&lines));
                }
                Err(e) => crate::error::note!("warning: generation lengths left out: {e}"),
            }
        }
    }
    if let Some(dir) = &opts.plot {
        plot::write_all(dir, &stats)?;
    }
    if opts.json {
        return Ok(format!(
            "{}\n",
            serde_json::to_string_pretty(&stats.to_json())?
        ));
    }
    Ok(render(&files, &stats, opts.plot.as_deref()))
}

fn render(files: &[PathBuf], s: &Stats, plots: Option<&Path>) -> String {
    let mut out = String::new();
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let _ = writeln!(out, "cache: {}\n", names.join(", "));
    out.push_str(&s.overview().render("pairs"));
    out.push_str(
        &s.lengths_table()
            .render("completion tokens (after truncation)"),
    );
    out.push_str(&s.bias_table().render("length bias"));
    out.push_str(
        &s.deciles_table()
            .render("win rate of the longer answer by |length difference| decile"),
    );
    if let Some(p) = &s.policy {
        out.push_str(
            &p.table()
                .render("trained policy on this split (implicit reward margin)"),
        );
    }
    if let Some(g) = &s.generations {
        let _ = writeln!(
            out,
            "generated lengths (refdpo generate), policy vs reference"
        );
        for line in g.text().lines() {
            let _ = writeln!(out, "  {line}");
        }
        out.push('\n');
    }
    if let Some(dir) = plots {
        let _ = writeln!(out, "charts written to {}", dir.display());
    }
    out
}

impl Table {
    /// Aligned text: a title line, then the header and rows padded per column.
    pub fn render(&self, title: &str) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.len()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let line = |cells: &[String]| -> String {
            let parts: Vec<String> = cells
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(i, (c, w))| {
                    if i == 0 {
                        format!("{c:<w$}")
                    } else {
                        format!("{c:>w$}")
                    }
                })
                .collect();
            format!("  {}\n", parts.join("  ").trim_end())
        };
        let mut out = format!("{title}\n");
        out.push_str(&line(&self.header));
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out.push('\n');
        out
    }
}

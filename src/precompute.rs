//! Stage one: dataset + reference model → `<split>.parquet`, `<split>.arrow` and `report.json`.
//! Every split is read and tokenized before any is scored, so a missing or malformed split fails
//! at once. Scoring is cut into fixed chunks of pairs written under `<out>/.partial-<split>/` as
//! they finish, so an interrupted run resumes where it stopped and ends with byte-identical outputs.

use crate::cache::{self, CacheRow, Fingerprint, MappedCache};
use crate::config::Config;
use crate::data::{self, DataSource, Skipped};
use crate::error::{fs, Error, Result};
use crate::inputs::Inputs;
use crate::logprobs;
use crate::model::Transformer;
use crate::outputs::{self, DirLock, Existing};
use crate::progress::Progress;
use crate::tokenize::{window, TokenizedPair};
use candle_core::Device;
use serde_json::json;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One split (or this process's shard of it), read and tokenized, ready to score.
struct Prepared {
    name: String,
    /// The file stem: the split, or `<split>.shard-<i>-of-<n>`.
    stem: String,
    rows_read: usize,
    pairs: Vec<TokenizedPair>,
    dropped: BTreeMap<String, usize>,
    /// The first skipped rows, with line numbers where the source has them.
    skipped: Vec<Skipped>,
    fingerprint: Fingerprint,
    /// Reading and tokenizing it.
    prepare_seconds: f64,
}

/// Runs stage one for the train and test splits; returns what was done, a line per split.
/// A split's files made from other inputs are refused unless `existing` is `Overwrite`.
pub fn run(cfg: &Config, device: &Device, existing: Existing, quiet: bool) -> Result<String> {
    let splits = [
        cfg.dataset.train_split.as_str(),
        cfg.dataset.test_split.as_str(),
    ];
    let (source, inputs) = Inputs::with_dataset(cfg, &splits)?;
    let mut splits = splits.to_vec();
    if !source.has_split(&cfg.dataset.test_split) {
        if !quiet {
            eprintln!(
                "no `{}` split in `{}`: no held-out evaluation. Set `dataset.test_size` (e.g. \
                 0.05) or `dataset.data_files.{}` for one",
                cfg.dataset.test_split, cfg.dataset.id, cfg.dataset.test_split
            );
        }
        splits.pop();
    }
    let prepared = splits
        .iter()
        .map(|split| prepare(cfg, &source, &inputs, split))
        .collect::<Result<Vec<_>>>()?;
    let out = &cfg.precompute.out;
    let shard = cfg.precompute.shard;
    // shards of one cache run side by side: each holds its own lock and writes its own report
    let (lock, report_name) = if shard.is_whole() {
        ("precompute".to_string(), "report.json".to_string())
    } else {
        let tag = format!("shard-{}-of-{}", shard.index, shard.count);
        (format!("precompute.{tag}"), format!("report.{tag}.json"))
    };
    let _lock = DirLock::acquire(out, &lock)?;
    for split in &prepared {
        claim_split(out, split, existing)?;
    }
    // Loaded on first use: a cache that is already up to date needs no model.
    let mut model = None;
    let mut summary = String::new();
    for split in prepared {
        let report = score_split(cfg, &inputs, &mut model, split, device, quiet)?;
        let _ = writeln!(summary, "{}", describe(&report));
        update_report(&out.join(&report_name), &report)?;
    }
    fs::write_atomic(&out.join("config.toml"), cfg.to_toml().as_bytes())?;
    let _ = write!(summary, "cache written to {}", out.display());
    Ok(summary)
}

/// How many skipped rows `report.json` lists one by one (all are counted by reason).
const SKIPPED_LISTED: usize = 100;

fn prepare(cfg: &Config, source: &DataSource, inputs: &Inputs, split: &str) -> Result<Prepared> {
    let started = Instant::now();
    let read = data::read_split(source, split, cfg.dataset.limit)?;
    let (mut pairs, mut skipped) = inputs.tokenizer.tokenize_all(&read.rows);
    skipped.extend(read.skipped);
    let all_pairs = pairs.len();
    // A shard: a contiguous range of the split's scoring chunks, so its chunks — and the batches
    // inside them — are the unsharded run's, and its log-probs the same bits. Its rows run from
    // its first pair's row to the next shard's (skipped rows in between counted here).
    let shard = cfg.precompute.shard;
    let chunk = cfg.precompute.chunk_pairs;
    let chunks = shard.range(pairs.len().div_ceil(chunk));
    let (p0, p1) = (
        (chunks.start * chunk).min(pairs.len()),
        (chunks.end * chunk).min(pairs.len()),
    );
    let boundary = |p: usize| match p {
        0 => 0,
        p if p == pairs.len() => usize::MAX,
        p => pairs[p].row as usize,
    };
    let rows = boundary(p0)..boundary(p1);
    pairs.truncate(p1);
    pairs.drain(..p0);
    skipped.retain(|s| rows.contains(&(s.row as usize)));
    let rows_read = if shard.is_whole() {
        read.rows_read
    } else {
        pairs.len() + skipped.len()
    };
    skipped.sort_by_key(|s| s.row);
    let mut dropped = BTreeMap::new();
    for s in &skipped {
        *dropped.entry(s.reason.to_string()).or_insert(0) += 1;
    }
    if all_pairs == 0 {
        let first = skipped
            .first()
            .map(|s| match s.line {
                Some(l) => format!("; the first, line {l}: {}", s.reason),
                None => format!("; the first, row {}: {}", s.row, s.reason),
            })
            .unwrap_or_default();
        return Err(Error::Schema {
            path: read.files[0].clone(),
            msg: format!(
                "split `{split}`: no row survived validation (skipped: {dropped:?}{first})"
            ),
        });
    }
    skipped.truncate(SKIPPED_LISTED);
    let mut fingerprint = inputs.fingerprint(cfg, split);
    if !shard.is_whole() {
        fingerprint.shard = shard.to_string();
    }
    Ok(Prepared {
        name: split.to_string(),
        stem: cache::shards::stem(split, shard),
        rows_read,
        pairs,
        dropped,
        skipped,
        fingerprint,
        prepare_seconds: started.elapsed().as_secs_f64(),
    })
}

/// A split's files (or unfinished chunks) made from other inputs: refused, naming the first
/// fingerprint field that differs, or removed with `--overwrite`.
fn claim_split(out: &Path, split: &Prepared, existing: Existing) -> Result<()> {
    let (pq, arrow) = (
        cache::parquet_path(out, &split.stem),
        cache::arrow_path(out, &split.stem),
    );
    let partial = partial_dir(out, &split.stem);
    let partial_fp = partial.join("fingerprint.json");
    let found = [
        (pq.clone(), cache::parquet::read_fingerprint(&pq).ok()),
        (
            arrow.clone(),
            MappedCache::open(&arrow).ok().map(|m| m.fingerprint),
        ),
        (
            partial.clone(),
            std::fs::read_to_string(&partial_fp)
                .ok()
                .and_then(|t| Fingerprint::from_json(&t, &partial_fp).ok()),
        ),
    ];
    let other = found.iter().find_map(|(path, fp)| {
        let diff = fp.as_ref()?.first_difference(&split.fingerprint, &[])?;
        Some((path, diff))
    });
    let Some((path, (field, theirs, ours))) = other else {
        return Ok(());
    };
    if existing != Existing::Overwrite {
        return Err(Error::Occupied {
            path: path.clone(),
            msg: format!(
                "holds a cache made from other inputs (fingerprint field `{field}` is {theirs} \
                 there but {ours} for this config): write this one elsewhere with `--set \
                 precompute.out=DIR`, or replace it with `--overwrite`"
            ),
        });
    }
    [pq, arrow, partial]
        .iter()
        .filter(|p| p.exists())
        .try_for_each(|p| outputs::remove(p))
}

fn partial_dir(out: &Path, split: &str) -> PathBuf {
    out.join(format!(".partial-{split}"))
}

/// What a split's cache files hold, against the fingerprint this config expects.
enum CacheState {
    /// Neither file.
    Nothing,
    /// Both files verify and carry the expected fingerprint.
    UpToDate,
    /// A file is missing, torn or fails its checksum (why): it is scored again.
    Broken(String),
}

fn cache_state(pq: &Path, arrow: &Path, fingerprint: &Fingerprint) -> CacheState {
    match (pq.exists(), arrow.exists()) {
        (false, false) => return CacheState::Nothing,
        (true, false) | (false, true) => {
            let missing = if pq.exists() { arrow } else { pq };
            return CacheState::Broken(format!(
                "`{}` is missing (an earlier run stopped before writing it)",
                missing.display()
            ));
        }
        (true, true) => {}
    }
    let check = || -> Result<bool> {
        let in_parquet = cache::parquet::read_fingerprint(pq)?;
        cache::parquet::verify(pq)?;
        let in_arrow = MappedCache::open(arrow)?.fingerprint;
        Ok(in_parquet == *fingerprint && in_arrow == *fingerprint)
    };
    match check() {
        Ok(true) => CacheState::UpToDate,
        Ok(false) => CacheState::Broken(format!("`{}` was made from other inputs", pq.display())),
        Err(e) => CacheState::Broken(e.to_string()),
    }
}

fn score_split(
    cfg: &Config,
    inputs: &Inputs,
    model: &mut Option<Transformer>,
    split: Prepared,
    device: &Device,
    quiet: bool,
) -> Result<Report> {
    let started = Instant::now();
    let out = &cfg.precompute.out;
    let (name, fingerprint) = (&split.stem, &split.fingerprint);
    let (pq, arrow) = (cache::parquet_path(out, name), cache::arrow_path(out, name));
    let fresh = match cache_state(&pq, &arrow, fingerprint) {
        CacheState::UpToDate => true,
        CacheState::Nothing => false,
        CacheState::Broken(why) => {
            eprintln!("{name}: scoring again: {why}");
            false
        }
    };
    let mut resumed = 0;
    let mut score_seconds = 0.0;
    if !fresh {
        let model = match model {
            Some(m) => m,
            None => model.insert(inputs.model.load(cfg.model.dtype.candle(), device)?),
        };
        let partial = partial_dir(out, name);
        let scoring = Instant::now();
        let scorer = Scorer { cfg, model, device };
        resumed = scorer.score_chunks(&split.pairs, &partial, fingerprint, quiet, name)?;
        score_seconds = scoring.elapsed().as_secs_f64();
        let mut cached = Vec::with_capacity(split.pairs.len());
        for c in 0..split.pairs.len().div_ceil(cfg.precompute.chunk_pairs) {
            let chunk = MappedCache::open(&chunk_path(&partial, c))?;
            cached.extend((0..chunk.len()).map(|i| chunk.to_row(i)));
        }
        cache::parquet::write(&pq, &cached, fingerprint)?;
        cache::ipc::write(&arrow, &cached, fingerprint)?;
        std::fs::remove_dir_all(&partial).map_err(|e| Error::io("cannot remove", &partial, e))?;
    }
    let tokens: usize = split.pairs.iter().map(|p| sequence_tokens(p, cfg)).sum();
    let seconds = split.prepare_seconds + started.elapsed().as_secs_f64();
    Ok(Report {
        split: split.name.clone(),
        entry: json!({
            "rows_read": split.rows_read,
            "rows_kept": split.pairs.len(),
            "dropped": split.dropped,
            "skipped_rows": split.skipped,
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_second": tokens as f64 / seconds.max(1e-9),
            // the reference forward + log-probs alone (0 when the cache was up to date)
            "score_seconds": score_seconds,
            "resumed_chunks": resumed,
            "up_to_date": fresh,
            "parquet": pq,
            "arrow": arrow,
        }),
    })
}

/// One split's entry of `report.json`.
struct Report {
    split: String,
    entry: serde_json::Value,
}

/// One line a split for the terminal: counts, skips by reason, throughput, files.
fn describe(r: &Report) -> String {
    let e = &r.entry;
    let n = |k: &str| e[k].as_u64().unwrap_or(0);
    let f = |k: &str| e[k].as_f64().unwrap_or(0.0);
    let skipped: Vec<String> = e["dropped"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k} {v}")).collect())
        .unwrap_or_default();
    let skipped_total = n("rows_read") - n("rows_kept");
    let done = if e["up_to_date"] == true {
        "cache was up to date".to_string()
    } else {
        let resumed = match n("resumed_chunks") {
            0 => String::new(),
            k => format!(", resumed {k} finished chunks"),
        };
        format!(
            "scored in {:.1} s, {:.0} tokens/s{resumed}",
            f("seconds"),
            f("tokens_per_second")
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
        n("rows_read"),
        n("rows_kept"),
        skipped_total,
        n("tokens"),
        e["parquet"].as_str().unwrap_or_default(),
        e["arrow"].as_str().unwrap_or_default(),
    )
}

/// Tokens a pair puts through the model (both sequences, after truncation).
fn sequence_tokens(p: &TokenizedPair, cfg: &Config) -> usize {
    let (l, t) = (cfg.tokenize.max_length, cfg.tokenize.truncation);
    let (pc, c) = window(&p.prompt_ids, &p.chosen_ids, l, t);
    let (pr, r) = window(&p.prompt_ids, &p.rejected_ids, l, t);
    pc.len() + c.len() + pr.len() + r.len()
}

fn chunk_path(partial: &Path, c: usize) -> PathBuf {
    partial.join(format!("chunk-{c:05}.arrow"))
}

/// The reference model and how to batch it.
struct Scorer<'a> {
    cfg: &'a Config,
    model: &'a Transformer,
    device: &'a Device,
}

impl Scorer<'_> {
    /// Scores every chunk not yet on disk; returns how many were already there (resumed).
    fn score_chunks(
        &self,
        pairs: &[TokenizedPair],
        partial: &Path,
        fp: &Fingerprint,
        quiet: bool,
        split: &str,
    ) -> Result<usize> {
        let fp_path = partial.join("fingerprint.json");
        if partial.exists() {
            let same = std::fs::read_to_string(&fp_path).is_ok_and(|t| t == fp.to_json());
            if !same {
                std::fs::remove_dir_all(partial)
                    .map_err(|e| Error::io("cannot remove stale", partial, e))?;
            }
        }
        fs::create_dir_all(partial)?;
        fs::write_atomic(&fp_path, fp.to_json().as_bytes())?;
        let progress = Progress::new(pairs.len() as u64, &format!("precompute {split}"), quiet);
        let mut resumed = 0;
        for (c, chunk_pairs) in pairs.chunks(self.cfg.precompute.chunk_pairs).enumerate() {
            let path = chunk_path(partial, c);
            // A chunk that does not verify (a torn or corrupted file) is scored again.
            if MappedCache::open(&path).is_ok_and(|m| m.fingerprint == *fp) {
                resumed += 1;
                progress.inc(chunk_pairs.len() as u64);
                continue;
            }
            let rows = self.score_chunk(chunk_pairs, &progress)?;
            cache::ipc::write(&path, &rows, fp)?;
        }
        progress.finish();
        Ok(resumed)
    }

    /// Scores one chunk in length-bucketed batches; rows come back in source order.
    fn score_chunk(&self, pairs: &[TokenizedPair], progress: &Progress) -> Result<Vec<CacheRow>> {
        let (l, t) = (self.cfg.tokenize.max_length, self.cfg.tokenize.truncation);
        let mut order: Vec<usize> = (0..pairs.len()).collect();
        // Longest first, so padding is small and the largest batch (peak memory) comes first.
        order.sort_by_cached_key(|&i| std::cmp::Reverse(sequence_tokens(&pairs[i], self.cfg)));
        let mut logps = vec![(0.0, 0.0); pairs.len()];
        for batch in order.chunks(self.cfg.precompute.batch_size) {
            let ids: Vec<_> = batch
                .iter()
                .map(|&i| {
                    let p = &pairs[i];
                    (
                        p.prompt_ids.as_slice(),
                        p.chosen_ids.as_slice(),
                        p.rejected_ids.as_slice(),
                    )
                })
                .collect();
            let scores = logprobs::score_pairs(self.model, &ids, l, t, self.device)?;
            for (&i, s) in batch.iter().zip(scores) {
                logps[i] = s;
            }
            progress.inc(batch.len() as u64);
        }
        Ok(pairs
            .iter()
            .zip(logps)
            .map(|(p, (c, r))| CacheRow {
                prompt_id: p.prompt_id.clone(),
                row: p.row,
                prompt_ids: p.prompt_ids.clone(),
                chosen_ids: p.chosen_ids.clone(),
                rejected_ids: p.rejected_ids.clone(),
                ref_chosen_logps: c,
                ref_rejected_logps: r,
                score_chosen: p.score_chosen,
                score_rejected: p.score_rejected,
                chosen_truncated: p.chosen_truncated,
                rejected_truncated: p.rejected_truncated,
            })
            .collect())
    }
}

/// Merges one split's entry into `report.json` (atomically).
fn update_report(path: &Path, report: &Report) -> Result<()> {
    let mut all: BTreeMap<String, serde_json::Value> = match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).unwrap_or_default(),
        Err(_) => BTreeMap::new(),
    };
    all.insert(report.split.clone(), report.entry.clone());
    fs::write_atomic(path, serde_json::to_string_pretty(&all)?.as_bytes())
}

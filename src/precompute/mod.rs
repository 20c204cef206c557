//! Stage one: dataset + reference model → `<split>.parquet`, `<split>.arrow` and `report.json`.
//! Every split is read and tokenized once before any is scored, so a missing or malformed split
//! fails at once; that pass keeps counts, and the pairs only while they fit one chunk. A split
//! of one chunk is scored from them; a larger one is read and tokenized again as a stream (on a
//! thread of its own, a chunk ahead of the scoring), in fixed chunks of pairs written under
//! `<out>/.partial-<split>/` as they finish, so memory stays at two chunks whatever the split's
//! size, and an interrupted run resumes where it stopped and ends with byte-identical outputs. The final files are written from the chunks.
//! Ctrl-C or SIGTERM while scoring stops at the next batch, keeping the finished chunks.

mod report;
mod scorer;
mod state;

use crate::cache::{self, Fingerprint, MappedCache};
use crate::config::Config;
use crate::data::{self, DataSource, PreferenceRow, Skipped};
use crate::dirs::CacheDir;
use crate::error::{fs, Error, Result};
use crate::inputs::Inputs;
use crate::model::Transformer;
use crate::outputs::{DirLock, Existing};
use crate::signals::StopRequest;
use crate::tokenize::{window, TokenizedPair};
use candle_core::Device;
use report::{describe, update_report, Report, SplitReport};
use scorer::{chunk_path, Scorer};
use state::{cache_state, claim_split, open_partial, partial_dir, CacheState};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Instant;

/// One split (or this process's shard of it), read and tokenized once, ready to score: counts,
/// and the pairs themselves only where they fit one chunk.
struct Prepared {
    name: String,
    /// The file stem: the split, or `<split>.shard-<i>-of-<n>`.
    stem: String,
    rows_read: usize,
    /// This shard's kept pairs, as indices among the split's kept pairs.
    pairs: std::ops::Range<usize>,
    /// The source row of its first pair (rows before it need no tokenizing when scoring).
    first_row: u64,
    /// Tokens it puts through the model.
    tokens: usize,
    dropped: BTreeMap<String, usize>,
    /// The first skipped rows, with line numbers where the source has them.
    skipped: Vec<Skipped>,
    fingerprint: Fingerprint,
    /// Reading and tokenizing it.
    prepare_seconds: f64,
    /// Its files, pinned before they were hashed: every reading checks it reads them, and
    /// their stamps are compared once it is scored.
    stamps: data::stamp::Pinned,
    /// This shard's pairs as the first read tokenized them, where the split's kept pairs fit
    /// one chunk (`precompute.chunk_pairs`): scored without reading and tokenizing it again.
    /// None for a larger split, which is streamed again a chunk at a time.
    kept: Option<Vec<TokenizedPair>>,
}

/// Rows tokenized at once (in parallel) while a split streams through.
const TOKENIZE_BATCH: usize = 1024;

/// Streams `split`'s rows from `from_row` on through the tokenizer, `TOKENIZE_BATCH` at a time:
/// `each` gets each row's outcome (a pair, or a counted skip) in source order and returns false
/// to stop. Returns the rows read.
fn for_each_pair(
    cfg: &Config,
    source: &DataSource,
    inputs: &Inputs,
    split: &str,
    from_row: u64,
    each: &mut dyn FnMut(std::result::Result<TokenizedPair, Skipped>) -> Result<bool>,
) -> Result<usize> {
    fn flush(
        inputs: &Inputs,
        buf: &mut Vec<std::result::Result<PreferenceRow, Skipped>>,
        each: &mut dyn FnMut(std::result::Result<TokenizedPair, Skipped>) -> Result<bool>,
    ) -> Result<bool> {
        let (mut rows, mut skips) = (Vec::with_capacity(buf.len()), Vec::new());
        for item in buf.drain(..) {
            match item {
                Ok(row) => {
                    rows.push(row);
                    skips.push(None);
                }
                Err(skip) => skips.push(Some(skip)),
            }
        }
        let mut pairs = inputs.tokenizer.tokenize_batch(&rows).into_iter();
        for skip in skips {
            let out = match skip {
                None => pairs.next().expect("one result per row"),
                Some(skip) => Err(skip),
            };
            if !each(out)? {
                return Ok(false);
            }
        }
        Ok(true)
    }
    let mut buf = Vec::with_capacity(TOKENIZE_BATCH);
    let mut going = true;
    let rows_read = data::for_each_row(source, split, cfg.dataset.limit, &mut |r| {
        let row = match &r {
            Ok(p) => p.row,
            Err(s) => s.row,
        };
        if row < from_row {
            return Ok(true);
        }
        buf.push(r);
        if buf.len() >= TOKENIZE_BATCH {
            going = flush(inputs, &mut buf, each)?;
        }
        Ok(going)
    })?;
    if going {
        flush(inputs, &mut buf, each)?;
    }
    Ok(rows_read)
}

/// Runs stage one for the train and test splits; returns what was done, a line per split.
/// A split's files made from other inputs are refused unless `existing` is `Overwrite`.
pub fn run(cfg: &Config, device: &Device, existing: Existing, quiet: bool) -> Result<String> {
    let splits = [
        cfg.dataset.train_split.as_str(),
        cfg.dataset.test_split.as_str(),
    ];
    let (source, inputs) = Inputs::with_dataset(cfg, &splits)?;
    crate::outputs::refuse_cache_inside(&cfg.precompute.out, source.data_folder())?;
    let mut splits = splits.to_vec();
    if source.replaced_test_files() > 0 {
        crate::error::note!(
            "warning: `{}` has its own `{}` split, which `dataset.test_size` = {} replaces with \
             rows held out of `{}`: leave `test_size` at 0 to evaluate on the published split",
            cfg.dataset.id,
            cfg.dataset.test_split,
            cfg.dataset.test_size,
            cfg.dataset.train_split
        );
    }
    if !source.has_split(&cfg.dataset.test_split) {
        // under --quiet too: what the run will not measure, not progress
        crate::error::note!(
            "no `{}` split in `{}`: no held-out evaluation. Set `dataset.test_size` (e.g. \
             0.05) or `dataset.data_files.{}` for one",
            cfg.dataset.test_split,
            cfg.dataset.id,
            cfg.dataset.test_split
        );
        splits.pop();
    }
    let prepared = splits
        .iter()
        .map(|split| prepare(cfg, &source, &inputs, split))
        .collect::<Result<Vec<_>>>()?;
    let out = &cfg.precompute.out;
    let shard = cfg.precompute.shard;
    // shards of one cache run side by side: each holds its own lock and writes its own report
    let dir = CacheDir::new(out);
    refuse_writing_inputs(&dir, shard, &prepared, &source)?;
    let lock = match DirLock::acquire(out, &CacheDir::lock_name(shard)) {
        Ok(lock) => Some(lock),
        // A cache this process may not write (a read-only file system, another user's folder)
        // that is up to date needs no writing: it is reported as such, and nothing is written.
        Err(e)
            if e.is_not_writable()
                && existing != Existing::Overwrite
                && prepared.iter().all(|split| {
                    matches!(
                        cache_state(
                            &dir.parquet(&split.stem),
                            &dir.arrow(&split.stem),
                            &split.fingerprint
                        ),
                        CacheState::UpToDate
                    )
                }) =>
        {
            None
        }
        Err(e) if e.is_not_writable() => {
            return Err(Error::Config(format!(
                "`{}` cannot be written here ({}), and its cache is not up to date for this \
                 config{}: write it elsewhere with --set precompute.out=DIR",
                out.display(),
                std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string),
                if existing == Existing::Overwrite {
                    " (--overwrite replaces it)"
                } else {
                    ""
                }
            )))
        }
        Err(e) => return Err(e),
    };
    for split in &prepared {
        claim_split(out, split, existing)?;
    }
    for split in &prepared {
        // (files that are there but stale or torn are found when the split is scored, and a
        // reader refuses them meanwhile)
        if !(dir.parquet(&split.stem).exists() && dir.arrow(&split.stem).exists()) {
            open_partial(&partial_dir(out, &split.stem), &split.fingerprint)?;
        }
    }
    // From here on, a stop request ends scoring at the next batch with the finished chunks kept.
    let stop = StopRequest::install()?;
    // Loaded on first use: a cache that is already up to date needs no model.
    let mut model = None;
    let mut summary = String::new();
    let mut all_up_to_date = true;
    for split in prepared {
        let scoring = Scoring {
            cfg,
            source: &source,
            inputs: &inputs,
            device,
            stop: &stop,
            quiet,
        };
        let report = score_split(&scoring, &mut model, split)?;
        all_up_to_date &= report.entry.up_to_date;
        let _ = writeln!(summary, "{}", describe(&report));
        if lock.is_some() {
            update_report(&dir.report(shard), &report)?;
        }
    }
    if lock.is_none() {
        let _ = write!(
            summary,
            "cache up to date in {} (not writable here: nothing written)",
            out.display()
        );
        return Ok(summary);
    }
    fs::write_atomic(&dir.config(), cfg.to_toml().as_bytes())?;
    let done = if all_up_to_date {
        "cache up to date in"
    } else {
        "cache written to"
    };
    let _ = write!(summary, "{done} {}", out.display());
    Ok(summary)
}

/// Refuses a cache whose files would replace a data file of the dataset (a single-file dataset
/// named `train_prefs.parquet` with `precompute.out` its own folder).
fn refuse_writing_inputs(
    dir: &CacheDir,
    shard: crate::config::Shard,
    prepared: &[Prepared],
    source: &DataSource,
) -> Result<()> {
    let mut writes = vec![dir.report(shard), dir.config()];
    let mut inputs = Vec::new();
    for split in prepared {
        writes.extend([dir.parquet(&split.stem), dir.arrow(&split.stem)]);
        for f in source.files(&split.name)? {
            inputs.push((f, "a data file of the dataset"));
        }
    }
    crate::outputs::refuse_writing_over(&writes, &inputs)
}

/// How many skipped rows `report.json` lists one by one (all are counted by reason).
const SKIPPED_LISTED: usize = 100;

fn prepare(cfg: &Config, source: &DataSource, inputs: &Inputs, split: &str) -> Result<Prepared> {
    let started = Instant::now();
    // One pass keeps, per kept pair, its source row and token count; and the skips.
    let (mut kept_rows, mut kept_tokens, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
    // the pairs themselves while they fit one chunk (then nothing more is kept)
    let mut kept = Some(Vec::new());
    // the data files' hashes (the fingerprint's record of the data), beside the reading pass
    let stamps = data::stamp::pin(&source.files(split)?)?;
    let (data_sha256, total_read) = std::thread::scope(|scope| {
        let hashing = scope.spawn(|| source.hash_files(split));
        let read = for_each_pair(cfg, source, inputs, split, 0, &mut |r| {
            match r {
                Ok(p) => {
                    kept_rows.push(p.row);
                    kept_tokens.push(sequence_tokens(&p, cfg));
                    kept = kept
                        .take()
                        .filter(|k| k.len() < cfg.precompute.chunk_pairs)
                        .map(|mut k| {
                            k.push(p);
                            k
                        });
                }
                Err(s) => skipped.push(s),
            }
            Ok(true)
        });
        (hashing.join().expect("hashing does not panic"), read)
    });
    let (data_sha256, total_read) = (data_sha256?, total_read?);
    stamps.unchanged()?;
    let all_pairs = kept_rows.len();
    if all_pairs == 0 {
        let mut dropped = BTreeMap::new();
        for s in &skipped {
            *dropped.entry(s.reason).or_insert(0) += 1;
        }
        let first = skipped
            .first()
            .map(|s| {
                let at = match s.line {
                    Some(l) => format!("line {l}"),
                    None => format!("row {}", s.row),
                };
                let detail = s
                    .detail
                    .as_deref()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default();
                format!("; the first, {at}: {}{detail}", s.reason)
            })
            .unwrap_or_default();
        // the reasons a mapping, not the data, usually causes: what to set
        let keys = &cfg.dataset.message_keys;
        let hint = match skipped.first().map(|s| s.reason) {
            Some("null_value") => format!(
                ". Every row lacking a value often means messages under other keys than \
                 `{}`/`{}`: map them with `dataset.message_keys` (e.g. role = \"from\", \
                 content = \"value\"); `refdpo show --index 0` prints the row as read",
                keys.role.as_deref().unwrap_or("role"),
                keys.content.as_deref().unwrap_or("content")
            ),
            Some("unknown_role") => ". Roles other than system, user, assistant and tool: map \
                 them with `dataset.roles` (e.g. human = \"user\", gpt = \"assistant\")"
                .into(),
            _ => String::new(),
        };
        return Err(Error::Schema {
            path: source.files(split)?[0].clone(),
            msg: format!(
                "split `{split}`: no row survived validation (skipped: {dropped:?}{first}){hint}"
            ),
        });
    }
    // A shard: a contiguous range of the split's scoring chunks, so its chunks — and the batches
    // inside them — are the unsharded run's, and its log-probs the same bits. Its rows run from
    // its first pair's row to the next shard's (skipped rows in between counted here).
    let shard = cfg.precompute.shard;
    let (pairs, rows) = shard_span(&kept_rows, cfg.precompute.chunk_pairs, shard);
    let (p0, p1) = (pairs.start, pairs.end);
    skipped.retain(|s| rows.contains(&s.row));
    let rows_read = if shard.is_whole() {
        total_read
    } else {
        (p1 - p0) + skipped.len()
    };
    skipped.sort_by_key(|s| s.row);
    let mut dropped = BTreeMap::new();
    for s in &skipped {
        *dropped.entry(s.reason.to_string()).or_insert(0) += 1;
    }
    skipped.truncate(SKIPPED_LISTED);
    let mut fingerprint = inputs.fingerprint(cfg, split);
    fingerprint.data_sha256 = data_sha256;
    fingerprint.dataset_commit = source.commit.clone().unwrap_or_default();
    if !shard.is_whole() {
        fingerprint.shard = Some(shard);
        fingerprint.shard_pairs = Some(cache::shards::ShardPairs {
            start: p0,
            end: p1,
            total: kept_rows.len(),
        });
    }
    Ok(Prepared {
        name: split.to_string(),
        stem: cache::shards::stem(split, shard),
        rows_read,
        first_row: kept_rows.get(p0).copied().unwrap_or(u64::MAX),
        tokens: kept_tokens[p0..p1].iter().sum(),
        pairs: p0..p1,
        dropped,
        skipped,
        fingerprint,
        prepare_seconds: started.elapsed().as_secs_f64(),
        stamps,
        kept: kept.map(|mut k| {
            k.truncate(p1);
            k.drain(..p0);
            k
        }),
    })
}

/// What shard `shard` of a split scores, given the source row of each of its kept pairs: its
/// pairs (a contiguous range of `chunk`-pair scoring chunks, as indices among the kept pairs)
/// and the source rows it accounts for (from its first pair's row to the next shard's; the
/// first shard from row 0, the last to the end), so every skipped row is counted by one shard.
fn shard_span(
    kept_rows: &[u64],
    chunk: usize,
    shard: crate::config::Shard,
) -> (std::ops::Range<usize>, std::ops::Range<u64>) {
    let all = kept_rows.len();
    let chunks = shard.range(all.div_ceil(chunk));
    let (p0, p1) = (
        (chunks.start * chunk).min(all),
        (chunks.end * chunk).min(all),
    );
    let boundary = |p: usize| match p {
        0 => 0,
        p if p == all => u64::MAX,
        p => kept_rows[p],
    };
    (p0..p1, boundary(p0)..boundary(p1))
}

/// What every split's scoring shares: the inputs, the device and the stop request.
struct Scoring<'a> {
    cfg: &'a Config,
    source: &'a DataSource,
    inputs: &'a Inputs,
    device: &'a Device,
    stop: &'a StopRequest,
    quiet: bool,
}

fn score_split(
    scoring: &Scoring,
    model: &mut Option<Transformer>,
    split: Prepared,
) -> Result<Report> {
    let &Scoring {
        cfg,
        inputs,
        device,
        ..
    } = scoring;
    let started = Instant::now();
    let out = &cfg.precompute.out;
    let (name, fingerprint) = (&split.stem, &split.fingerprint);
    let (pq, arrow) = (cache::parquet_path(out, name), cache::arrow_path(out, name));
    let fresh = match cache_state(&pq, &arrow, fingerprint) {
        CacheState::UpToDate => true,
        CacheState::Nothing => false,
        CacheState::Broken(why) => {
            crate::error::note!("{name}: scoring again: {why}");
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
        let scoring_started = Instant::now();
        let scorer = Scorer { scoring, model };
        resumed = scorer.score_chunks(&split, &partial)?;
        // what was scored is what was hashed
        split.stamps.unchanged()?;
        score_seconds = scoring_started.elapsed().as_secs_f64();
        // the final files from the chunk files, a few thousand rows in memory at a time
        let chunks = split.pairs.len().div_ceil(cfg.precompute.chunk_pairs);
        let dir = partial.as_path();
        let rows = || {
            (0..chunks).flat_map(move |c| {
                let chunk = MappedCache::open(&chunk_path(dir, c));
                let n = chunk.as_ref().map_or(1, MappedCache::len);
                (0..n).map(move |i| match &chunk {
                    Ok(m) => Ok(m.to_row(i)),
                    Err(e) => Err(Error::Schema {
                        path: chunk_path(dir, c),
                        msg: format!("cannot read a finished chunk: {e}"),
                    }),
                })
            })
        };
        cache::parquet::write_rows(&pq, rows(), fingerprint)?;
        cache::ipc::write_rows(&arrow, rows(), fingerprint)?;
        std::fs::remove_dir_all(&partial).map_err(|e| Error::io("cannot remove", &partial, e))?;
    }
    let tokens = split.tokens;
    let seconds = split.prepare_seconds + started.elapsed().as_secs_f64();
    Ok(Report {
        split: split.name.clone(),
        entry: SplitReport {
            rows_read: split.rows_read,
            rows_kept: split.pairs.len(),
            dropped: split.dropped,
            skipped_rows: split.skipped.iter().map(report::listed).collect(),
            tokens,
            seconds,
            tokens_per_second: tokens as f64 / seconds.max(1e-9),
            score_seconds,
            resumed_chunks: resumed,
            up_to_date: fresh,
            parquet: pq,
            arrow,
        },
    })
}

/// Tokens a pair puts through the model (both sequences, after truncation).
fn sequence_tokens(p: &TokenizedPair, cfg: &Config) -> usize {
    let (l, t) = (cfg.tokenize.max_length, cfg.tokenize.truncation);
    let (pc, c) = window(&p.prompt_ids, &p.chosen_ids, l, t);
    let (pr, r) = window(&p.prompt_ids, &p.rejected_ids, l, t);
    pc.len() + c.len() + pr.len() + r.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Shard;

    #[test]
    fn shards_take_whole_chunks_and_every_row_once() {
        // 10 kept pairs at these source rows (skips between them), chunks of 3 pairs
        let kept: Vec<u64> = vec![0, 2, 3, 7, 8, 9, 12, 13, 20, 21];
        let whole = shard_span(&kept, 3, Shard::default());
        assert_eq!(whole, (0..10, 0..u64::MAX));
        let spans: Vec<_> = (0..3)
            .map(|index| shard_span(&kept, 3, Shard { index, count: 3 }))
            .collect();
        // 4 chunks over 3 shards: 1, 1 and 2 chunks
        assert_eq!(spans[0], (0..3, 0..7));
        assert_eq!(spans[1], (3..6, 7..12));
        assert_eq!(spans[2], (6..10, 12..u64::MAX));
        // more shards than chunks: some are empty (here the first), none is split
        let first = shard_span(&kept[..2], 3, Shard { index: 0, count: 2 });
        let second = shard_span(&kept[..2], 3, Shard { index: 1, count: 2 });
        assert_eq!((first.0, second.0), (0..0, 0..2));
    }
}

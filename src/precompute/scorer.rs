//! Scoring one split's chunks: the pairs its first read kept (one chunk), or the split streamed
//! again through the tokenizer a chunk ahead of the scoring; each chunk of
//! pairs not yet on disk put through the reference model and written under the split's partial
//! folder, a finished chunk checked to hold exactly the pairs it should before it is reused.

use super::state::open_partial;
use super::{for_each_pair, sequence_tokens, Prepared, Scoring};
use crate::cache::{self, CacheRow, MappedCache};
use crate::dirs::CacheDir;
use crate::error::{Error, Result};
use crate::logprobs;
use crate::model::Transformer;
use crate::progress::Progress;
use crate::tokenize::TokenizedPair;
use candle_core::DType;
use std::path::{Path, PathBuf};

/// Whether a finished chunk holds exactly these pairs, in this order: their source rows and ids.
fn holds(chunk: &MappedCache, pairs: &[TokenizedPair]) -> bool {
    chunk.len() == pairs.len()
        && pairs.iter().enumerate().all(|(i, p)| {
            let r = chunk.to_row(i);
            r.row == p.row
                && r.prompt_ids == p.prompt_ids
                && r.chosen_ids == p.chosen_ids
                && r.rejected_ids == p.rejected_ids
        })
}

pub(super) fn chunk_path(partial: &Path, c: usize) -> PathBuf {
    CacheDir::chunk(partial, c)
}

/// The reference model, where the pairs come from, and how to batch them.
pub(super) struct Scorer<'a> {
    pub(super) scoring: &'a Scoring<'a>,
    pub(super) model: &'a Transformer,
}

impl Scorer<'_> {
    /// Scores every chunk of this shard not yet on disk; returns how many were already there
    /// (resumed). A split of one chunk is the pairs its first read kept; a larger one is
    /// streamed again, its reading and tokenizing on a thread of their own a chunk ahead of the
    /// scoring, so the device is not idle while the next rows are tokenized: two chunks of
    /// pairs are in memory at a time. A stop request ends it at the
    /// next batch: an error saying which chunks are kept.
    pub(super) fn score_chunks(&self, split: &Prepared, partial: &Path) -> Result<usize> {
        let Scoring {
            cfg,
            source,
            inputs,
            quiet,
            ..
        } = *self.scoring;
        let fp = &split.fingerprint;
        open_partial(partial, fp)?;
        let progress = Progress::new(
            split.pairs.len() as u64,
            &format!("precompute {}", split.stem),
            quiet,
        );
        let size = cfg.precompute.chunk_pairs;
        let chunks = split.pairs.len().div_ceil(size);
        let (mut resumed, mut chunk) = (0, 0);
        let mut finish = |buf: &[TokenizedPair]| -> Result<()> {
            let path = chunk_path(partial, chunk);
            chunk += 1;
            // A chunk that does not verify (a torn or corrupted file) or holds other pairs (another
            // `chunk_pairs`, a file copied over it) is scored again.
            if MappedCache::open(&path).is_ok_and(|m| m.fingerprint == *fp && holds(&m, buf)) {
                resumed += 1;
                progress.inc(buf.len() as u64);
            } else {
                let Some(rows) = self.score_chunk(buf, &progress)? else {
                    progress.finish();
                    return Err(stopped(&split.stem, chunk - 1, chunks, partial));
                };
                cache::ipc::write(&path, &rows, fp)?;
            }
            Ok(())
        };
        // set once the scoring has stopped taking chunks (an error, a stop request)
        let quit = std::sync::atomic::AtomicBool::new(false);
        // the index of the next kept pair among the split's (the shard's first from its first row)
        let k = if let Some(pairs) = &split.kept {
            // one chunk, kept from the first read
            if !pairs.is_empty() {
                finish(pairs)?;
            }
            split.pairs.start + pairs.len()
        } else if split.pairs.is_empty() {
            split.pairs.start
        } else {
            std::thread::scope(|scope| -> Result<usize> {
                // a chunk handed over only when the scoring takes it: one more in the making
                let (chunks_out, chunks_in) =
                    std::sync::mpsc::sync_channel::<Vec<TokenizedPair>>(0);
                let quit = &quit;
                let reader = scope.spawn(move || -> Result<usize> {
                    // room for one chunk, or the whole split where that is smaller
                    // (`chunk_pairs` may be huge)
                    let room = size.min(split.pairs.len());
                    let (mut k, mut buf) = (split.pairs.start, Vec::with_capacity(room));
                    for_each_pair(
                        cfg,
                        source,
                        inputs,
                        &split.name,
                        split.first_row,
                        &mut |r| {
                            if quit.load(std::sync::atomic::Ordering::Relaxed) {
                                return Ok(false);
                            }
                            let Ok(pair) = r else { return Ok(true) };
                            buf.push(pair);
                            k += 1;
                            if buf.len() == size || k == split.pairs.end {
                                let full = std::mem::replace(&mut buf, Vec::with_capacity(room));
                                // the scoring stopped (an error, a stop request): read no further
                                if chunks_out.send(full).is_err() {
                                    return Ok(false);
                                }
                            }
                            Ok(k < split.pairs.end)
                        },
                    )?;
                    Ok(k)
                });
                let scored = chunks_in.iter().try_for_each(|buf| finish(&buf));
                // the reader ends at its next pair (or its next chunk's hand-over) once the
                // scoring stops taking them
                quit.store(true, std::sync::atomic::Ordering::Relaxed);
                drop(chunks_in);
                let read = reader
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                scored?;
                read
            })?
        };
        progress.finish();
        if k != split.pairs.end {
            return Err(Error::Schema {
                path: source.files(&split.name)?[0].clone(),
                msg: format!(
                    "split `{}` gave {} pairs on the second read, {} on the first: did its files \
                     change while stage one ran?",
                    split.name,
                    k - split.pairs.start,
                    split.pairs.len()
                ),
            });
        }
        Ok(resumed)
    }

    /// A pair whose reference log-prob is NaN or infinite: never cached, an error naming it.
    fn non_finite(&self, p: &TokenizedPair, (c, r): (f64, f64)) -> Error {
        let dtype = self.scoring.cfg.model.dtype.candle();
        let hint = match crate::inputs::compute_dtype(dtype, self.scoring.device) {
            DType::F16 => {
                " f16 ends at 65504, the likely cause: set `model.dtype = \"bf16\"` (or \"f32\")"
            }
            DType::F32 => {
                " The weights are finite, so the forward overflowed even in f32: some weights are \
                 far too large (check the model's largest magnitudes)"
            }
            _ => " The weights are finite, so the forward overflowed: try `model.dtype = \"f32\"`",
        };
        Error::Model(format!(
            "source row {} (prompt_id {}): the reference log-probs are {c} (chosen) and {r} \
             (rejected), not finite numbers, so no cache is written.{hint}",
            p.row, p.prompt_id
        ))
    }

    /// Scores one chunk in length-bucketed batches; rows come back in source order. None: a stop
    /// was requested before the chunk was done.
    fn score_chunk(
        &self,
        pairs: &[TokenizedPair],
        progress: &Progress,
    ) -> Result<Option<Vec<CacheRow>>> {
        let Scoring {
            cfg, device, stop, ..
        } = *self.scoring;
        let (l, t) = (cfg.tokenize.max_length, cfg.tokenize.truncation);
        let mut order: Vec<usize> = (0..pairs.len()).collect();
        // Longest first, so padding is small and the largest batch (peak memory) comes first.
        order.sort_by_cached_key(|&i| std::cmp::Reverse(sequence_tokens(&pairs[i], cfg)));
        let mut logps = vec![(0.0, 0.0); pairs.len()];
        for batch in order.chunks(cfg.precompute.batch_size) {
            if stop.requested() {
                return Ok(None);
            }
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
            let scores = logprobs::score_pairs(self.model, &ids, l, t, device)?;
            for (&i, s) in batch.iter().zip(scores) {
                let p = &pairs[i];
                if !(s.0.is_finite() && s.1.is_finite()) {
                    return Err(self.non_finite(p, s));
                }
                let (c, r) = (p.chosen_ids.len(), p.rejected_ids.len());
                if !(cache::possible_ref_logp(s.0, c) && cache::possible_ref_logp(s.1, r)) {
                    return Err(Error::Model(format!(
                        "source row {} (prompt_id {}): the reference log-probs are {} (chosen, \
                         {c} tokens) and {} (rejected, {r} tokens), not sums between {} per \
                         token and 0, so no cache is written: the model's forward is broken \
                         (check its weights' magnitudes)",
                        p.row,
                        p.prompt_id,
                        s.0,
                        s.1,
                        cache::MIN_REF_LOGP_PER_TOKEN
                    )));
                }
                logps[i] = s;
            }
            progress.inc(batch.len() as u64);
        }
        Ok(Some(
            pairs
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
                .collect(),
        ))
    }
}

/// After Ctrl-C / SIGTERM while scoring chunk `at` (0-based) of `chunks`: what is kept.
fn stopped(stem: &str, at: usize, chunks: usize, partial: &Path) -> Error {
    Error::Interrupted(format!(
        "stopped while scoring chunk {} of {chunks} of `{stem}`; the {at} finished before it are \
         kept in {}: run the same `refdpo precompute` to go on from there",
        at + 1,
        partial.display()
    ))
}

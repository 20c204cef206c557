//! Stage one: dataset + reference model → `<split>.parquet`, `<split>.arrow` and `report.json`.
//! Work is cut into fixed chunks of pairs written under `<out>/.partial-<split>/` as they finish, so
//! an interrupted run resumes where it stopped and ends with byte-identical outputs.

use crate::cache::{self, CacheRow, Fingerprint, MappedCache};
use crate::config::Config;
use crate::data;
use crate::error::{fs, Error, Result};
use crate::hub;
use crate::logprobs;
use crate::model::{weights, Transformer, TransformerConfig};
use crate::progress::Progress;
use crate::tokenize::{PairTokenizer, TokenizedPair};
use candle_core::{DType, Device};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A resolved model: its directory (hub snapshot or local), config and weight files.
pub struct ModelSource {
    pub dir: PathBuf,
    pub revision: String,
    pub cfg: TransformerConfig,
    pub weight_files: Vec<PathBuf>,
    pub weights_sha256: String,
}

impl ModelSource {
    /// Generates the demo assets if asked, then resolves only the model (stage two and
    /// `stats --run` need no dataset).
    pub fn resolve(cfg: &Config) -> Result<Self> {
        if cfg.demo.generate {
            data::demo::ensure(&cfg.demo)?;
        }
        Self::open(hub::model(&cfg.model.id, &cfg.model.revision)?)
    }

    fn open(m: hub::RepoDir) -> Result<Self> {
        let cfg = TransformerConfig::from_file(&m.dir.join("config.json"))?;
        let weight_files = weights::weight_files(&m.dir)?;
        let weights_sha256 = weights::hash_files(&weight_files)?;
        Ok(Self {
            dir: m.dir,
            revision: m.revision,
            cfg,
            weight_files,
            weights_sha256,
        })
    }

    /// The frozen model in `dtype` on `device`, built from plain (untracked) tensors.
    pub fn load(&self, dtype: DType, device: &Device) -> Result<Transformer> {
        let tensors = weights::load(&self.weight_files, dtype, device)?;
        Transformer::new(&self.cfg, &tensors)
    }
}

/// The resolved inputs of a run: dataset directory, model and tokenizer.
pub struct Sources {
    pub dataset_dir: PathBuf,
    pub dataset_revision: String,
    pub model: ModelSource,
    pub tokenizer: PairTokenizer,
}

impl Sources {
    /// Generates the demo assets if asked, then resolves dataset and model (hub or local).
    pub fn resolve(cfg: &Config, splits: &[&str]) -> Result<Self> {
        if cfg.demo.generate {
            data::demo::ensure(&cfg.demo)?;
        }
        // the dataset first: its errors come first
        let ds = hub::dataset(&cfg.dataset.id, &cfg.dataset.revision, splits)?;
        let model = ModelSource::open(hub::model(&cfg.model.id, &cfg.model.revision)?)?;
        let tokenizer =
            PairTokenizer::from_dir(&model.dir, cfg.tokenize.max_length, cfg.tokenize.truncation)?;
        Ok(Self {
            dataset_dir: ds.dir,
            dataset_revision: ds.revision,
            model,
            tokenizer,
        })
    }

    pub fn fingerprint(&self, cfg: &Config, split: &str) -> Fingerprint {
        Fingerprint {
            dataset_id: cfg.dataset.id.clone(),
            dataset_revision: self.dataset_revision.clone(),
            split: split.to_string(),
            limit: cfg.dataset.limit,
            model_id: cfg.model.id.clone(),
            model_revision: self.model.revision.clone(),
            weights_sha256: self.model.weights_sha256.clone(),
            tokenizer_sha256: self.tokenizer.tokenizer_sha256().to_string(),
            chat_template_sha256: self.tokenizer.template.sha256(),
            max_length: cfg.tokenize.max_length,
            truncation: cfg.tokenize.truncation.as_str().to_string(),
            dtype: cfg.model.dtype.clone(),
            refdpo_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

pub fn parse_dtype(name: &str) -> Result<DType> {
    match name {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => Err(Error::Config(format!(
            "`model.dtype` = {other:?}: use f32, bf16 or f16"
        ))),
    }
}

/// Runs stage one for the train and test splits.
pub fn run(cfg: &Config, device: &Device, quiet: bool) -> Result<()> {
    let splits = [
        cfg.dataset.train_split.as_str(),
        cfg.dataset.test_split.as_str(),
    ];
    let sources = Sources::resolve(cfg, &splits)?;
    let out = &cfg.precompute.out;
    fs::create_dir_all(out)?;
    fs::write_atomic(&out.join("config.toml"), cfg.to_toml().as_bytes())?;
    let model = sources.model.load(parse_dtype(&cfg.model.dtype)?, device)?;
    for split in splits {
        let report = run_split(cfg, &sources, &model, split, device, quiet)?;
        update_report(&out.join("report.json"), split, report)?;
    }
    Ok(())
}

fn run_split(
    cfg: &Config,
    src: &Sources,
    model: &Transformer,
    split: &str,
    device: &Device,
    quiet: bool,
) -> Result<serde_json::Value> {
    let started = Instant::now();
    let out = &cfg.precompute.out;
    let fingerprint = src.fingerprint(cfg, split);
    let (pq, arrow) = (
        cache::parquet_path(out, split),
        cache::arrow_path(out, split),
    );
    let files = data::split_files(&src.dataset_dir, split)?;
    let rows = data::read_split(&files, cfg.dataset.limit)?;
    let (pairs, dropped) = src.tokenizer.tokenize_all(&rows);
    if pairs.is_empty() {
        return Err(Error::Schema {
            path: files[0].clone(),
            msg: format!("split `{split}`: no row survived validation (dropped: {dropped:?})"),
        });
    }
    let up_to_date = pq.exists()
        && arrow.exists()
        && cache::parquet::read_fingerprint(&pq).ok().as_ref() == Some(&fingerprint)
        && MappedCache::open(&arrow).is_ok_and(|m| m.fingerprint == fingerprint);
    let mut resumed = 0;
    let mut score_seconds = 0.0;
    if up_to_date {
        if !quiet {
            eprintln!("{split}: cache is up to date ({})", pq.display());
        }
    } else {
        let partial = out.join(format!(".partial-{split}"));
        let scoring = Instant::now();
        resumed = score_chunks(
            cfg,
            model,
            &pairs,
            &partial,
            &fingerprint,
            device,
            quiet,
            split,
        )?;
        score_seconds = scoring.elapsed().as_secs_f64();
        let mut cached = Vec::with_capacity(pairs.len());
        for c in 0..pairs.len().div_ceil(cfg.precompute.chunk_pairs) {
            let chunk = MappedCache::open(&chunk_path(&partial, c))?;
            cached.extend((0..chunk.len()).map(|i| chunk.to_row(i)));
        }
        cache::parquet::write(&pq, &cached, &fingerprint)?;
        cache::ipc::write(&arrow, &cached, &fingerprint)?;
        std::fs::remove_dir_all(&partial).map_err(|e| Error::io("cannot remove", &partial, e))?;
    }
    let tokens: usize = pairs.iter().map(|p| sequence_tokens(p, cfg)).sum();
    let seconds = started.elapsed().as_secs_f64();
    Ok(json!({
        "rows_read": rows.len(),
        "rows_kept": pairs.len(),
        "dropped": dropped,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens as f64 / seconds.max(1e-9),
        // the reference forward + log-probs alone (0 when the cache was up to date)
        "score_seconds": score_seconds,
        "resumed_chunks": resumed,
        "up_to_date": up_to_date,
        "parquet": pq,
        "arrow": arrow,
    }))
}

/// Tokens a pair puts through the model (both sequences, after truncation).
fn sequence_tokens(p: &TokenizedPair, cfg: &Config) -> usize {
    let (l, t) = (cfg.tokenize.max_length, cfg.tokenize.truncation);
    let (pc, c) = crate::tokenize::window(&p.prompt_ids, &p.chosen_ids, l, t);
    let (pr, r) = crate::tokenize::window(&p.prompt_ids, &p.rejected_ids, l, t);
    pc.len() + c.len() + pr.len() + r.len()
}

fn chunk_path(partial: &Path, c: usize) -> PathBuf {
    partial.join(format!("chunk-{c:05}.arrow"))
}

/// Scores every chunk not yet on disk; returns how many were already there (resumed).
#[allow(clippy::too_many_arguments)]
fn score_chunks(
    cfg: &Config,
    model: &Transformer,
    pairs: &[TokenizedPair],
    partial: &Path,
    fp: &Fingerprint,
    device: &Device,
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
    let chunk = cfg.precompute.chunk_pairs;
    let progress = Progress::new(pairs.len() as u64, &format!("precompute {split}"), quiet);
    let mut resumed = 0;
    for (c, chunk_pairs) in pairs.chunks(chunk).enumerate() {
        let path = chunk_path(partial, c);
        if path.exists() {
            resumed += 1;
            progress.inc(chunk_pairs.len() as u64);
            continue;
        }
        let rows = score_chunk(cfg, model, chunk_pairs, device, &progress)?;
        cache::ipc::write(&path, &rows, fp)?;
    }
    progress.finish();
    Ok(resumed)
}

/// Scores one chunk in length-bucketed batches; rows come back in source order.
fn score_chunk(
    cfg: &Config,
    model: &Transformer,
    pairs: &[TokenizedPair],
    device: &Device,
    progress: &Progress,
) -> Result<Vec<CacheRow>> {
    let (l, t) = (cfg.tokenize.max_length, cfg.tokenize.truncation);
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    // Longest first, so padding is small and the largest batch (peak memory) comes first.
    order.sort_by_cached_key(|&i| std::cmp::Reverse(sequence_tokens(&pairs[i], cfg)));
    let mut logps = vec![(0.0, 0.0); pairs.len()];
    for batch in order.chunks(cfg.precompute.batch_size) {
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
        let scores = logprobs::score_pairs(model, &ids, l, t, device)?;
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

/// Merges one split's entry into `report.json` (atomically).
fn update_report(path: &Path, split: &str, entry: serde_json::Value) -> Result<()> {
    let mut report: BTreeMap<String, serde_json::Value> = match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).unwrap_or_default(),
        Err(_) => BTreeMap::new(),
    };
    report.insert(split.to_string(), entry);
    fs::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())
}

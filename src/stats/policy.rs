//! `stats --run`: the trained policy's implicit reward margin on a cache split, against the length
//! difference — does the policy learn to exploit length?

use super::queries::{f, scalar, Table};
use crate::cache;
use crate::error::Result;
use crate::inputs::Inputs;
use crate::logprobs;
use candle_core::Device;
use polars::prelude::*;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

/// The trained policy's view of length (from `--run`).
pub struct PolicyBias {
    pub run: String,
    pub pairs: usize,
    pub beta: f64,
    pub figures: Map<String, Value>,
    /// (len_diff, implicit reward margin) per pair, for the chart.
    pub points: Vec<(f64, f64)>,
}

impl PolicyBias {
    pub fn table(&self) -> Table {
        let rows = self
            .figures
            .iter()
            .map(|(k, v)| vec![k.clone(), v.as_f64().map_or_else(|| v.to_string(), f)])
            .collect();
        Table {
            header: vec![
                format!("{} ({} pairs, beta {})", self.run, self.pairs, self.beta),
                "value".into(),
            ],
            rows,
        }
    }
}

/// Scores the split with the run's final policy and relates its implicit reward margin
/// β·[(π(c) − ref(c)) − (π(r) − ref(r))] to the length difference. The cache must belong to the
/// run: its fingerprint is checked against the run's own configuration.
pub fn policy_bias(
    run_dir: &Path,
    split: &str,
    files: &[PathBuf],
    device: &Device,
) -> Result<PolicyBias> {
    let run = crate::dirs::RunDir::new(run_dir);
    let cfg = run.load_config()?;
    let inputs = Inputs::resolve(&cfg)?;
    let mut rows = Vec::new();
    for f in files {
        let cached = cache::parquet::read_fingerprint(f)?;
        let expected = inputs.fingerprint(&cfg, &cached.split);
        cached.check_compatible(&cache::shards::expected_for(f, split, &expected), f)?;
        rows.extend(cache::parquet::read(f)?);
    }
    // a full checkpoint, or a LoRA adapter merged into the run's base model, over the weights
    // rounded to `model.dtype` as training scored them (the cache's reference was too)
    let model = run.load_policy(&cfg, &inputs, cfg.model.dtype.candle(), device)?;
    let (l, t) = (cfg.tokenize.max_length, cfg.tokenize.truncation);
    let mut margins = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(cfg.precompute.batch_size.max(1)) {
        let ids: Vec<_> = chunk
            .iter()
            .map(|r| {
                (
                    r.prompt_ids.as_slice(),
                    r.chosen_ids.as_slice(),
                    r.rejected_ids.as_slice(),
                )
            })
            .collect();
        for (r, (pc, pr)) in chunk
            .iter()
            .zip(logprobs::score_pairs(&model, &ids, l, t, device)?)
        {
            let beta = cfg.train.beta;
            margins.push(beta * ((pc - r.ref_chosen_logps) - (pr - r.ref_rejected_logps)));
        }
    }
    let len_diff: Vec<f64> = rows
        .iter()
        .map(|r| r.chosen_ids.len() as f64 - r.rejected_ids.len() as f64)
        .collect();
    let df = df!("len_diff" => &len_diff, "margin" => &margins)?;
    let out = df
        .lazy()
        .select([
            super::queries::spearman("len_diff", "margin").alias("margin_len_diff_spearman"),
            super::queries::pearson("len_diff", "margin").alias("margin_len_diff_pearson"),
            col("margin")
                .gt(lit(0.0))
                .cast(DataType::Float64)
                .mean()
                .alias("reward_accuracy"),
            // Among pairs of unequal length: how often the policy's implicit reward favours the
            // longer answer (a margin of 0 favours neither)
            (col("margin").gt(lit(0.0)).and(col("len_diff").gt(lit(0.0))))
                .or(col("margin").lt(lit(0.0)).and(col("len_diff").lt(lit(0.0))))
                .filter(col("len_diff").neq(lit(0.0)))
                .cast(DataType::Float64)
                .mean()
                .alias("prefers_longer_frac"),
            col("len_diff")
                .gt(lit(0.0))
                .filter(col("len_diff").neq(lit(0.0)))
                .cast(DataType::Float64)
                .mean()
                .alias("data_longer_chosen_frac"),
            col("margin").mean().alias("margin_mean"),
        ])
        .collect()?;
    let mut figures = Map::new();
    for c in out.get_column_names() {
        figures.insert(c.to_string(), json!(scalar(&out, c)?));
    }
    Ok(PolicyBias {
        run: run_dir.display().to_string(),
        pairs: rows.len(),
        beta: cfg.train.beta,
        figures,
        points: len_diff.into_iter().zip(margins).collect(),
    })
}

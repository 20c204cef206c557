//! The statistics themselves, as polars LazyFrame queries over the cache parquet (the same
//! definitions as the Python polars queries in the README's "Querying the cache").

use super::policy::PolicyBias;
use crate::cache;
use crate::error::{Error, Result};
use polars::prelude::*;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Spearman's rank correlation of two columns (average ranks for ties), null where it is
/// undefined, as scipy's is NaN: when either column holds one value only (polars would return
/// the rounding noise of its ranks' mean, e.g. 0.0122 for 501 pairs of equal lengths).
pub fn spearman(a: &str, b: &str) -> Expr {
    let varies = |c: &str| col(c).drop_nulls().n_unique().gt(lit(1));
    when(varies(a).and(varies(b)))
        .then(spearman_rank_corr(col(a), col(b), false))
        .otherwise(lit(NULL).cast(DataType::Float64))
}

/// Pearson's correlation of two columns, each first divided by its largest magnitude (which
/// leaves the correlation as it is): polars' products of deviations overflow past ~1e154 and
/// gave 0 where scipy gives the value.
pub fn pearson(a: &str, b: &str) -> Expr {
    let scaled = |c: &str| col(c) / col(c).abs().max();
    pearson_corr(scaled(a), scaled(b))
}

/// A table for the terminal: header and string cells.
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

/// One side's completion-length distribution.
pub struct LengthRow {
    pub side: &'static str,
    pub mean: f64,
    pub median: f64,
    pub p10: f64,
    pub p90: f64,
    pub max: f64,
}

/// Pairs whose |length difference| falls in one decile, and how often the longer answer won.
pub struct DecileRow {
    pub decile: i64,
    pub pairs: u64,
    pub abs_diff_min: f64,
    pub abs_diff_max: f64,
    pub longer_wins: f64,
}

pub struct Stats {
    /// Scalar figures under their JSON names.
    pub summary: Map<String, Value>,
    pub lengths: Vec<LengthRow>,
    pub deciles: Vec<DecileRow>,
    pub dropped: BTreeMap<String, u64>,
    pub chosen_len: Vec<f64>,
    pub rejected_len: Vec<f64>,
    pub len_diff: Vec<f64>,
    pub ref_margin: Vec<f64>,
    pub policy: Option<PolicyBias>,
    /// `stats --run`: the lengths of `refdpo generate`'s output beside the run, if there is one.
    pub generations: Option<crate::generate::Summary>,
}

pub(super) fn f(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else if x.fract() == 0.0 && x.abs() < 1e9 {
        format!("{x:.0}")
    } else {
        format!("{x:.4}")
    }
}

/// The cache (one file, or a split's shards in order) with derived columns: lengths,
/// differences, margins.
pub fn frame(files: &[PathBuf]) -> Result<LazyFrame> {
    let scans = files
        .iter()
        .map(|f| {
            let path = f
                .to_str()
                .ok_or_else(|| Error::Config(format!("`{}` is not valid UTF-8", f.display())))?;
            Ok(LazyFrame::scan_parquet(
                PlRefPath::new(path),
                ScanArgsParquet::default(),
            )?)
        })
        .collect::<Result<Vec<_>>>()?;
    let lf = if scans.len() == 1 {
        scans.into_iter().next().expect("one scan")
    } else {
        concat(scans, UnionArgs::default())?
    };
    let len = |c: &str| col(c).list().len().cast(DataType::Float64);
    Ok(lf
        .with_columns([
            len(cache::schema::col::PROMPT_IDS).alias("prompt_len"),
            len(cache::schema::col::CHOSEN_IDS).alias("chosen_len"),
            len(cache::schema::col::REJECTED_IDS).alias("rejected_len"),
            col("ref_chosen_logps")
                .cast(DataType::Float64)
                .alias("ref_chosen"),
            col("ref_rejected_logps")
                .cast(DataType::Float64)
                .alias("ref_rejected"),
        ])
        .with_columns([
            (col("chosen_len") - col("rejected_len")).alias("len_diff"),
            (col("score_chosen") - col("score_rejected")).alias("score_diff"),
            (col("ref_chosen") - col("ref_rejected")).alias("ref_margin"),
        ]))
}

pub(super) fn scalar(df: &DataFrame, name: &str) -> Result<f64> {
    let c = df.column(name)?.cast(&DataType::Float64)?;
    Ok(c.f64()?.get(0).unwrap_or(f64::NAN))
}

fn floats(df: &DataFrame, name: &str) -> Result<Vec<f64>> {
    let c = df.column(name)?.cast(&DataType::Float64)?;
    let ca = c.f64()?;
    Ok((0..ca.len())
        .map(|i| ca.get(i).unwrap_or(f64::NAN))
        .collect())
}

fn q(name: &str, p: f64) -> Expr {
    col(name).quantile(lit(p), QuantileMethod::Linear)
}

/// Refuses a file with an impossible pair ([`cache::impossible_pair`]), by file and pair, as
/// training does: statistics over the rest would leave it out unsaid.
pub fn check_pairs(files: &[PathBuf]) -> Result<()> {
    for file in files {
        let df = frame(std::slice::from_ref(file))?
            .select([
                col("prompt_len"),
                col("chosen_len"),
                col("rejected_len"),
                col("ref_chosen"),
                col("ref_rejected"),
            ])
            .collect()?;
        let [p, c, r, rc, rr] = [
            "prompt_len",
            "chosen_len",
            "rejected_len",
            "ref_chosen",
            "ref_rejected",
        ]
        .map(|name| floats(&df, name));
        let (p, c, r, rc, rr) = (p?, c?, r?, rc?, rr?);
        let fp = cache::parquet::read_fingerprint(file)?;
        let window = (fp.max_length, fp.truncation);
        // a missing length (null) reads as NaN: no sequence
        let len = |x: f64| if x.is_finite() { x as usize } else { 0 };
        for i in 0..p.len() {
            if let Some(what) =
                cache::impossible_pair([len(p[i]), len(c[i]), len(r[i])], [rc[i], rr[i]], window)
            {
                return Err(cache::checksum::corrupt(
                    file,
                    format!("pair {i} has {what}"),
                ));
            }
        }
    }
    Ok(())
}

pub fn compute(files: &[PathBuf]) -> Result<Stats> {
    let lf = frame(files)?;
    let frac = |e: Expr| e.cast(DataType::Float64).mean();
    let mut exprs = vec![
        len().cast(DataType::Float64).alias("pairs"),
        col("chosen_len").mean().alias("chosen_tokens_mean"),
        col("rejected_len").mean().alias("rejected_tokens_mean"),
        col("prompt_len").mean().alias("prompt_tokens_mean"),
        frac(col("chosen_len").gt(col("rejected_len"))).alias("chosen_longer_frac"),
        frac(col("chosen_len").eq(col("rejected_len"))).alias("equal_length_frac"),
        frac(col("score_chosen").eq(col("score_rejected"))).alias("ties_frac"),
        col("score_diff").mean().alias("score_gap_mean"),
        col("score_diff").median().alias("score_gap_median"),
        q("score_diff", 0.1).alias("score_gap_p10"),
        q("score_diff", 0.9).alias("score_gap_p90"),
        col("score_diff").min().alias("score_gap_min"),
        col("score_diff").max().alias("score_gap_max"),
        frac(col("chosen_truncated")).alias("chosen_truncated_frac"),
        frac(col("rejected_truncated")).alias("rejected_truncated_frac"),
        spearman("len_diff", "score_diff").alias("score_diff_len_diff_spearman"),
        pearson("len_diff", "score_diff").alias("score_diff_len_diff_pearson"),
        spearman("len_diff", "ref_margin").alias("ref_margin_len_diff_spearman"),
        pearson("len_diff", "ref_margin").alias("ref_margin_len_diff_pearson"),
        col("ref_margin").mean().alias("ref_margin_mean"),
        (col("ref_chosen") / col("chosen_len"))
            .mean()
            .alias("ref_chosen_logps_per_token_mean"),
        (col("ref_rejected") / col("rejected_len"))
            .mean()
            .alias("ref_rejected_logps_per_token_mean"),
    ];
    for side in ["chosen", "rejected"] {
        let c = format!("{side}_len");
        exprs.push(col(&c).median().alias(format!("{side}_tokens_median")));
        exprs.push(q(&c, 0.1).alias(format!("{side}_tokens_p10")));
        exprs.push(q(&c, 0.9).alias(format!("{side}_tokens_p90")));
        exprs.push(col(&c).max().alias(format!("{side}_tokens_max")));
    }
    let df = lf.clone().select(exprs).collect()?;
    let mut summary = Map::new();
    for c in df.get_column_names() {
        let v = scalar(&df, c)?;
        let v = if c.as_str() == "pairs" {
            json!(v as u64)
        } else {
            json!(v)
        };
        summary.insert(c.to_string(), if v.is_null() { Value::Null } else { v });
    }
    let get = |k: &str| summary.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let lengths = ["chosen", "rejected"]
        .into_iter()
        .map(|side| LengthRow {
            side,
            mean: get(&format!("{side}_tokens_mean")),
            median: get(&format!("{side}_tokens_median")),
            p10: get(&format!("{side}_tokens_p10")),
            p90: get(&format!("{side}_tokens_p90")),
            max: get(&format!("{side}_tokens_max")),
        })
        .collect();
    let deciles = deciles(lf.clone())?;
    let cols = lf
        .select([
            col("chosen_len"),
            col("rejected_len"),
            col("len_diff"),
            col("ref_margin"),
        ])
        .collect()?;
    Ok(Stats {
        summary,
        lengths,
        deciles,
        dropped: BTreeMap::new(),
        chosen_len: floats(&cols, "chosen_len")?,
        rejected_len: floats(&cols, "rejected_len")?,
        len_diff: floats(&cols, "len_diff")?,
        ref_margin: floats(&cols, "ref_margin")?,
        policy: None,
        generations: None,
    })
}

/// Pairs of unequal length, in deciles of |len_diff| (ordinal ranks, file order breaking ties):
/// decile = floor((rank − 1) · 10 / n); per decile the share where the longer answer is chosen.
fn deciles(lf: LazyFrame) -> Result<Vec<DecileRow>> {
    let rank = RankOptions {
        method: RankMethod::Ordinal,
        descending: false,
    };
    let df = lf
        .filter(col("len_diff").neq(lit(0.0)))
        .with_column(col("len_diff").abs().alias("abs_diff"))
        .with_column(
            ((col("abs_diff").rank(rank, None).cast(DataType::Float64) - lit(1.0)) * lit(10.0)
                / len().cast(DataType::Float64))
            .cast(DataType::Int64) // truncation = floor: the value is never negative
            .alias("decile"),
        )
        .group_by([col("decile")])
        .agg([
            len().cast(DataType::UInt64).alias("pairs"),
            col("abs_diff").min().alias("abs_diff_min"),
            col("abs_diff").max().alias("abs_diff_max"),
            col("len_diff")
                .gt(lit(0.0))
                .cast(DataType::Float64)
                .mean()
                .alias("longer_wins"),
        ])
        .sort(["decile"], SortMultipleOptions::default())
        .collect()?;
    let d = df.column("decile")?.i64()?.clone();
    let n = df.column("pairs")?.u64()?.clone();
    let (lo, hi, w) = (
        floats(&df, "abs_diff_min")?,
        floats(&df, "abs_diff_max")?,
        floats(&df, "longer_wins")?,
    );
    Ok((0..df.height())
        .map(|i| DecileRow {
            decile: d.get(i).unwrap_or(-1),
            pairs: n.get(i).unwrap_or(0),
            abs_diff_min: lo[i],
            abs_diff_max: hi[i],
            longer_wins: w[i],
        })
        .collect())
}

impl Stats {
    /// Adds the split's drop counts from its reports (`report.json`, or each shard's), if the
    /// cache directory has them.
    pub fn add_dropped(&mut self, reports: &[PathBuf], split: &str) {
        let mut rows_read = None;
        for report in reports {
            let entry = match crate::cache::report::read(report) {
                Ok(mut r) => r.remove(split),
                Err(e) if report.exists() => {
                    crate::error::note!(
                        "warning: {e:#}; the rows stage one skipped are not counted"
                    );
                    None
                }
                Err(_) => None,
            };
            let Some(entry) = entry else {
                continue;
            };
            for (k, n) in entry.dropped {
                *self.dropped.entry(k).or_default() += n as u64;
            }
            *rows_read.get_or_insert(0) += entry.rows_read as u64;
        }
        if let Some(n) = rows_read {
            self.summary.insert("rows_read".into(), n.into());
        }
    }

    pub fn to_json(&self) -> Value {
        let mut m = self.summary.clone();
        m.insert("dropped".into(), json!(self.dropped));
        m.insert(
            "length_diff_deciles".into(),
            Value::Array(
                self.deciles
                    .iter()
                    .map(|d| {
                        json!({"decile": d.decile, "pairs": d.pairs, "abs_diff_min": d.abs_diff_min,
                                    "abs_diff_max": d.abs_diff_max, "longer_wins": d.longer_wins})
                    })
                    .collect(),
            ),
        );
        if let Some(p) = &self.policy {
            let mut pm = p.figures.clone();
            pm.insert("run".into(), json!(p.run));
            pm.insert("pairs".into(), json!(p.pairs));
            pm.insert("beta".into(), json!(p.beta));
            m.insert("policy".into(), Value::Object(pm));
        }
        if let Some(g) = &self.generations {
            m.insert("generations".into(), Value::Object(g.figures()));
        }
        Value::Object(m)
    }

    fn num(&self, k: &str) -> f64 {
        self.summary
            .get(k)
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN)
    }

    pub fn overview(&self) -> Table {
        let mut rows: Vec<Vec<String>> = [
            ("rows read", "rows_read"),
            ("pairs kept", "pairs"),
            ("chosen longer (strictly)", "chosen_longer_frac"),
            ("equal length", "equal_length_frac"),
            ("score ties", "ties_frac"),
            ("score gap mean", "score_gap_mean"),
            ("score gap median / p10 / p90", "score_gap_median"),
            ("chosen truncated", "chosen_truncated_frac"),
            ("rejected truncated", "rejected_truncated_frac"),
            ("prompt tokens mean", "prompt_tokens_mean"),
        ]
        .into_iter()
        .map(|(label, key)| {
            let v = if key == "score_gap_median" {
                format!(
                    "{} / {} / {}",
                    f(self.num(key)),
                    f(self.num("score_gap_p10")),
                    f(self.num("score_gap_p90"))
                )
            } else {
                f(self.num(key))
            };
            vec![label.to_string(), v]
        })
        .collect();
        for (reason, n) in &self.dropped {
            rows.push(vec![format!("dropped: {reason}"), n.to_string()]);
        }
        Table {
            header: vec!["".into(), "value".into()],
            rows,
        }
    }

    pub fn lengths_table(&self) -> Table {
        Table {
            header: [
                "side",
                "mean",
                "median",
                "p10",
                "p90",
                "max",
                "ref logp/token",
            ]
            .map(String::from)
            .to_vec(),
            rows: self
                .lengths
                .iter()
                .map(|l| {
                    let per_token = self.num(&format!("ref_{}_logps_per_token_mean", l.side));
                    vec![
                        l.side.to_string(),
                        f(l.mean),
                        f(l.median),
                        f(l.p10),
                        f(l.p90),
                        f(l.max),
                        f(per_token),
                    ]
                })
                .collect(),
        }
    }

    pub fn bias_table(&self) -> Table {
        let row = |what: &str, key: &str| {
            vec![
                what.to_string(),
                f(self.num(&format!("{key}_spearman"))),
                f(self.num(&format!("{key}_pearson"))),
            ]
        };
        Table {
            header: ["length difference vs", "spearman", "pearson"]
                .map(String::from)
                .to_vec(),
            rows: vec![
                row("score difference (annotators)", "score_diff_len_diff"),
                row(
                    "reference margin (ref_chosen - ref_rejected)",
                    "ref_margin_len_diff",
                ),
            ],
        }
    }

    pub fn deciles_table(&self) -> Table {
        Table {
            header: ["decile", "pairs", "|len diff|", "longer answer chosen"]
                .map(String::from)
                .to_vec(),
            rows: self
                .deciles
                .iter()
                .map(|d| {
                    vec![
                        (d.decile + 1).to_string(),
                        d.pairs.to_string(),
                        format!("{}-{}", f(d.abs_diff_min), f(d.abs_diff_max)),
                        f(d.longer_wins),
                    ]
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// scipy.stats.spearmanr([1, 2, 3, 4], [1, 3, 2, 4]) = 0.8; NaN with a constant side, where
    /// polars' own rank correlation gives the noise of its ranks' mean (501 pairs: 0.0122).
    #[test]
    fn spearman_is_null_where_a_side_is_constant() {
        let corr = |a: Vec<f64>, b: Vec<f64>| -> Option<f64> {
            let df = df!("a" => &a, "b" => &b).unwrap();
            let out = df
                .lazy()
                .select([spearman("a", "b").alias("s")])
                .collect()
                .unwrap();
            out.column("s").unwrap().f64().unwrap().get(0)
        };
        let s = corr(vec![1.0, 2.0, 3.0, 4.0], vec![1.0, 3.0, 2.0, 4.0]).unwrap();
        assert!((s - 0.8).abs() < 1e-12, "{s}");
        let varying: Vec<f64> = (0..501).map(|i| ((i * 7919) % 501) as f64).collect();
        assert_eq!(corr(vec![3.0; 501], varying.clone()), None);
        assert_eq!(corr(varying, vec![-1.5; 501]), None);
        // scipy.stats.pearsonr([1, 2, 3, 4], [1, 3, 2, 4]) = 0.8, at any scale
        let pearson_of = |scale: f64| -> f64 {
            let (a, b) = (vec![1.0, 2.0, 3.0, 4.0], vec![1.0, 3.0, 2.0, 4.0]);
            let b: Vec<f64> = b.into_iter().map(|x| x * scale).collect();
            let df = df!("a" => &a, "b" => &b).unwrap();
            let out = df
                .lazy()
                .select([pearson("a", "b").alias("p")])
                .collect()
                .unwrap();
            out.column("p").unwrap().f64().unwrap().get(0).unwrap()
        };
        for scale in [1.0, -1e160, 1e300] {
            let want = if scale < 0.0 { -0.8 } else { 0.8 };
            assert!((pearson_of(scale) - want).abs() < 1e-12, "{scale}");
        }
    }
}

//! The length summary of a generations file: tokens per model (mean, median), how many hit the
//! token limit, and how often the policy wrote more than the reference for the same prompt.

use super::line::GenerationLine;
use crate::charts;
use crate::error::{fs, Result};
use serde_json::{json, Map, Value};
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// Generated lengths per model, in prompt order.
#[derive(Debug, Clone)]
pub struct Summary {
    pub max_new_tokens: usize,
    /// ("reference" | "policy", tokens per prompt, finished per prompt).
    pub models: Vec<(String, Vec<usize>, Vec<bool>)>,
}

impl Summary {
    /// From the lines `generate` writes.
    pub fn of_lines(lines: &[GenerationLine], max_new_tokens: usize) -> Self {
        let models = ["reference", "policy"]
            .into_iter()
            .filter(|m| lines.first().is_some_and(|l| l.of(m).is_some()))
            .map(|m| {
                let of = |l: &GenerationLine| l.of(m).cloned();
                let tokens = lines
                    .iter()
                    .map(|l| of(l).map_or(0, |c| c.tokens))
                    .collect();
                let finished = lines
                    .iter()
                    .map(|l| of(l).is_some_and(|c| c.finished))
                    .collect();
                (m.to_string(), tokens, finished)
            })
            .collect();
        Self {
            max_new_tokens,
            models,
        }
    }

    /// The summary of lines read back (the token limit is taken as the longest generation seen).
    pub fn of_read(lines: &[GenerationLine]) -> Self {
        let mut s = Self::of_lines(lines, 0);
        s.max_new_tokens = s
            .models
            .iter()
            .flat_map(|(_, t, _)| t.iter().copied())
            .max()
            .unwrap_or(0);
        s
    }

    /// The figures, as one JSON object per model plus the comparison.
    pub fn figures(&self) -> Map<String, Value> {
        let mut out = Map::new();
        for (name, tokens, finished) in &self.models {
            let mut sorted = tokens.clone();
            sorted.sort_unstable();
            let n = tokens.len().max(1) as f64;
            let median = match sorted.len() {
                0 => 0.0,
                k if k % 2 == 1 => sorted[k / 2] as f64,
                k => (sorted[k / 2 - 1] + sorted[k / 2]) as f64 / 2.0,
            };
            out.insert(
                name.clone(),
                json!({
                    "prompts": tokens.len(),
                    "mean_tokens": tokens.iter().sum::<usize>() as f64 / n,
                    "median_tokens": median,
                    "hit_token_limit": finished.iter().filter(|f| !**f).count(),
                }),
            );
        }
        if let [(_, r, _), (_, p, _)] = self.models.as_slice() {
            let n = r.len().max(1) as f64;
            let count = |f: fn(usize, usize) -> bool| {
                r.iter().zip(p).filter(|(&a, &b)| f(a, b)).count() as f64 / n
            };
            out.insert(
                "policy_vs_reference".into(),
                json!({
                    "policy_longer_frac": count(|r, p| p > r),
                    "policy_shorter_frac": count(|r, p| p < r),
                    "same_length_frac": count(|r, p| p == r),
                }),
            );
        }
        out
    }

    /// A small table for stdout.
    pub fn text(&self) -> String {
        let f = self.figures();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<10} {:>8} {:>12} {:>14} {:>16}",
            "model", "prompts", "mean tokens", "median tokens", "hit the limit"
        );
        for (name, _, _) in &self.models {
            let m = &f[name];
            let _ = writeln!(
                out,
                "{:<10} {:>8} {:>12.1} {:>14.1} {:>16}",
                name,
                // as text: a JSON value's Display ignores the width
                m["prompts"].to_string(),
                m["mean_tokens"].as_f64().unwrap_or(0.0),
                m["median_tokens"].as_f64().unwrap_or(0.0),
                m["hit_token_limit"].to_string()
            );
        }
        if let Some(c) = f.get("policy_vs_reference") {
            let pct = |k: &str| 100.0 * c[k].as_f64().unwrap_or(0.0);
            let _ = writeln!(
                out,
                "policy longer than the reference on {:.0}% of prompts, shorter on {:.0}%, as long on {:.0}%",
                pct("policy_longer_frac"),
                pct("policy_shorter_frac"),
                pct("same_length_frac")
            );
        }
        out
    }

    /// `lengths.svg` in `dir`: the generated-length histograms of both models.
    pub fn plot(&self, dir: &Path) -> Result<PathBuf> {
        fs::create_dir_all(dir)?;
        let path = dir.join("generation_lengths.svg");
        let series: Vec<charts::Values> = self
            .models
            .iter()
            .map(|(n, t, _)| {
                let color = if n == "policy" {
                    charts::POLICY
                } else {
                    charts::REFERENCE
                };
                (n.as_str(), color, t.iter().map(|&x| x as f64).collect())
            })
            .collect();
        charts::histogram(
            &path,
            &format!(
                "Generated tokens per prompt (limit {})",
                self.max_new_tokens
            ),
            "generated tokens",
            "prompts",
            &series,
        )?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::line::Continuation;

    #[test]
    fn figures_count_lengths_limits_and_the_longer_model() {
        let c = |tokens: usize, finished: bool| Continuation {
            ids: vec![7; tokens],
            text: String::new(),
            tokens,
            finished,
        };
        let line = |r, rf, p, pf| GenerationLine {
            row: 0,
            prompt_id: String::new(),
            prompt_ids: vec![1],
            reference: c(r, rf),
            policy: Some(c(p, pf)),
            policy_step: Some(4),
        };
        let lines = [
            line(3, true, 8, false),
            line(5, true, 5, true),
            line(8, false, 2, true),
            line(4, true, 6, true),
        ];
        // the table's columns line up under their headers
        let text = Summary::of_lines(&lines, 8).text();
        let widths: Vec<usize> = text.lines().take(3).map(str::len).collect();
        assert_eq!(widths, [widths[0]; 3], "{text}");
        let f = Summary::of_lines(&lines, 8).figures();
        assert_eq!(f["reference"]["mean_tokens"], 5.0);
        assert_eq!(f["reference"]["median_tokens"], 4.5);
        assert_eq!(f["reference"]["hit_token_limit"], 1);
        assert_eq!(f["policy"]["hit_token_limit"], 1);
        let c = &f["policy_vs_reference"];
        assert_eq!(c["policy_longer_frac"], 0.5);
        assert_eq!(c["policy_shorter_frac"], 0.25);
        assert_eq!(c["same_length_frac"], 0.25);
    }
}

//! What `refdpo judge` reports: one line per prompt (`judge-<split>.jsonl`) and the figures over
//! them, as a table, one JSON object (SPEC's names) and charts.

use super::winrate::{self, LengthControlled};
use crate::error::Result;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::fmt::Write;
use std::path::PathBuf;

/// Bootstrap resamples of the win rate's interval.
pub const RESAMPLES: usize = 1000;

/// Below this many prompts the interval carries a warning.
const MIN_PROMPTS_FOR_CI: usize = 20;

/// One judged prompt (a line of `judge-<split>.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeLine {
    pub row: u64,
    pub prompt_id: String,
    pub reference_reward: f64,
    pub policy_reward: f64,
    /// Generated tokens (the policy's tokenizer), as `generate` counted them.
    pub reference_tokens: usize,
    pub policy_tokens: usize,
    /// 1, 0.5 on equal rewards, or 0.
    pub win: f64,
    /// The split's own pair for this prompt, scored by the same reward model.
    pub chosen_reward: f64,
    pub rejected_reward: f64,
}

/// The figures over every judged prompt.
#[derive(Debug, Clone)]
pub struct Judgement {
    pub split: String,
    pub generations: PathBuf,
    pub reward_model: String,
    pub out: PathBuf,
    pub seed: u64,
    pub lines: Vec<JudgeLine>,
    pub win_rate: f64,
    pub win_rate_ci: (f64, f64),
    pub lc: LengthControlled,
    /// (lowest d, highest d, win rate, prompts) per quintile of d = policy − reference tokens.
    pub quintiles: Vec<(f64, f64, f64, usize)>,
    pub reward_length_correlation: f64,
    pub reward_model_accuracy: f64,
    /// The pairs whose chosen and rejected answers the reward model scores equal (neither is
    /// counted as agreeing in `reward_model_accuracy`, TRL's strict rule).
    pub reward_model_ties: usize,
    /// Prompts left out because a sequence of theirs is longer than the reward model reads, and
    /// its positions.
    pub too_long: (usize, usize),
}

fn mean(x: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = x.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    s / n.max(1) as f64
}

/// JSON's number, or null where the figure is undefined (NaN).
fn num(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}

impl Judgement {
    /// The figures of judged `lines` (each with its rewards and lengths).
    pub fn of(
        lines: Vec<JudgeLine>,
        seed: u64,
        split: String,
        generations: PathBuf,
        reward_model: String,
        out: PathBuf,
    ) -> Self {
        let wins: Vec<f64> = lines.iter().map(|l| l.win).collect();
        let d: Vec<f64> = lines
            .iter()
            .map(|l| l.policy_tokens as f64 - l.reference_tokens as f64)
            .collect();
        let gaps: Vec<f64> = lines
            .iter()
            .map(|l| l.policy_reward - l.reference_reward)
            .collect();
        let accuracy = mean(lines.iter().map(|l| {
            if l.chosen_reward > l.rejected_reward {
                1.0
            } else {
                0.0
            }
        }));
        Self {
            win_rate: mean(wins.iter().copied()),
            win_rate_ci: winrate::bootstrap_ci(&wins, seed, RESAMPLES),
            lc: winrate::length_controlled(&wins, &d),
            quintiles: winrate::quintiles(&wins, &d),
            reward_length_correlation: winrate::pearson(&gaps, &d),
            reward_model_accuracy: accuracy,
            reward_model_ties: lines
                .iter()
                .filter(|l| l.chosen_reward == l.rejected_reward)
                .count(),
            too_long: (0, 0),
            split,
            generations,
            reward_model,
            out,
            seed,
            lines,
        }
    }

    /// Why the bootstrap interval claims more certainty than the prompts give, if it does: a
    /// percentile bootstrap never leaves the observed outcomes, so all alike give an interval
    /// of no width, and a handful of prompts one far too narrow.
    pub fn win_rate_ci_note(&self) -> Option<&'static str> {
        let first = self.lines.first().map(|l| l.win);
        if self.lines.iter().all(|l| Some(l.win) == first) {
            Some("every prompt has the same outcome: the interval has no width, not certainty")
        } else if self.lines.len() < MIN_PROMPTS_FOR_CI {
            Some("fewer than 20 prompts: a bootstrap interval this small understates the uncertainty")
        } else {
            None
        }
    }

    pub fn mean_reward(&self, model: &str) -> f64 {
        mean(self.lines.iter().map(|l| match model {
            "policy" => l.policy_reward,
            _ => l.reference_reward,
        }))
    }

    pub fn mean_tokens(&self, model: &str) -> f64 {
        mean(self.lines.iter().map(|l| match model {
            "policy" => l.policy_tokens as f64,
            _ => l.reference_tokens as f64,
        }))
    }

    /// SPEC's object (`--json`), plus the fit, the quintiles and the correlation.
    pub fn to_json(&self) -> Value {
        json!({
            "prompts": self.lines.len(),
            "split": self.split,
            "generations": self.generations,
            "reward_model": self.reward_model,
            "out": self.out,
            "mean_reward_reference": num(self.mean_reward("reference")),
            "mean_reward_policy": num(self.mean_reward("policy")),
            "mean_tokens_reference": num(self.mean_tokens("reference")),
            "mean_tokens_policy": num(self.mean_tokens("policy")),
            "win_rate": num(self.win_rate),
            "win_rate_ci": [num(self.win_rate_ci.0), num(self.win_rate_ci.1)],
            "win_rate_ci_note": self.win_rate_ci_note(),
            "bootstrap": {"resamples": RESAMPLES, "seed": self.seed},
            "lc_win_rate": num(self.lc.lc_win_rate),
            "lc_fit": {"a": num(self.lc.a), "b": num(self.lc.b), "note": self.lc.note},
            "win_rate_by_length_quintile": self.quintiles.iter().map(|(lo, hi, rate, n)| json!({
                "length_diff_min": lo, "length_diff_max": hi, "win_rate": rate, "prompts": n,
            })).collect::<Vec<_>>(),
            "reward_length_correlation": num(self.reward_length_correlation),
            "reward_model_accuracy": num(self.reward_model_accuracy),
            "reward_model_pairs": self.lines.len(),
            "reward_model_ties": self.reward_model_ties,
            "skipped_too_long": self.too_long.0,
        })
    }

    /// The lines of `judge-<split>.jsonl`.
    pub fn jsonl(&self) -> Result<String> {
        let mut text = String::new();
        for l in &self.lines {
            text.push_str(&serde_json::to_string(l)?);
            text.push('\n');
        }
        Ok(text)
    }

    /// The report's tables (stdout).
    pub fn text(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "judged {} prompts of `{}` ({}) with reward model {}",
            self.lines.len(),
            self.split,
            self.generations.display(),
            self.reward_model
        );
        if self.too_long.0 > 0 {
            let _ = writeln!(
                o,
                "left out {} prompts with a sequence longer than the reward model's {} positions",
                self.too_long.0, self.too_long.1
            );
        }
        let _ = writeln!(o, "\n{:<14} {:>12} {:>12}", "", "reference", "policy");
        let _ = writeln!(
            o,
            "{:<14} {:>12.4} {:>12.4}",
            "mean reward",
            self.mean_reward("reference"),
            self.mean_reward("policy")
        );
        let _ = writeln!(
            o,
            "{:<14} {:>12.1} {:>12.1}",
            "mean tokens",
            self.mean_tokens("reference"),
            self.mean_tokens("policy")
        );
        let _ = writeln!(
            o,
            "\nwin rate of the policy over the reference  {:.3}  95% CI [{:.3}, {:.3}] \
             (bootstrap, {RESAMPLES} resamples, seed {})",
            self.win_rate, self.win_rate_ci.0, self.win_rate_ci.1, self.seed
        );
        if let Some(note) = self.win_rate_ci_note() {
            let _ = writeln!(o, "{:<43}(the interval: {note})", "");
        }
        let lc = match self.lc.note {
            None => format!(
                "{:.3}  (σ(a), a = {:.4}, b = {:.4})",
                self.lc.lc_win_rate, self.lc.a, self.lc.b
            ),
            Some(note) => format!("{:.3}  ({note})", self.lc.lc_win_rate),
        };
        let _ = writeln!(o, "length-controlled win rate                 {lc}");
        let _ = writeln!(
            o,
            "correlation of reward gap and length gap   {:.3}",
            self.reward_length_correlation
        );
        let ties = match self.reward_model_ties {
            0 => String::new(),
            n => format!(", {n} scored equal, counted as disagreeing"),
        };
        let _ = writeln!(
            o,
            "reward model's accuracy on the pairs       {:.3}  ({} pairs{ties}: does it agree \
             with the annotators?)",
            self.reward_model_accuracy,
            self.lines.len()
        );
        let _ = writeln!(
            o,
            "\nwin rate by quintile of length difference (policy − reference tokens)"
        );
        let _ = writeln!(
            o,
            "{:>10} {:>10} {:>8} {:>9}",
            "from", "to", "prompts", "win rate"
        );
        for (lo, hi, rate, n) in &self.quintiles {
            let _ = writeln!(o, "{lo:>10} {hi:>10} {n:>8} {rate:>9.3}");
        }
        let _ = writeln!(o, "\nper prompt: {}", self.out.display());
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judged(wins: &[f64], tie_pairs: usize) -> Judgement {
        let lines = wins
            .iter()
            .enumerate()
            .map(|(i, &win)| JudgeLine {
                row: i as u64,
                prompt_id: i.to_string(),
                reference_reward: 0.0,
                policy_reward: win,
                reference_tokens: 3,
                policy_tokens: 3 + i,
                win,
                chosen_reward: 1.0,
                rejected_reward: if i < tie_pairs { 1.0 } else { 0.0 },
            })
            .collect();
        Judgement::of(lines, 0, "t".into(), "g".into(), "rm".into(), "o".into())
    }

    /// A percentile bootstrap of outcomes all alike is [w, w]; of two prompts, almost as
    /// narrow: both are said, so a zero-width interval is not read as certainty.
    #[test]
    fn an_interval_that_claims_certainty_says_why_not() {
        let all_won = judged(&[1.0; 30], 0);
        assert_eq!(all_won.win_rate_ci, (1.0, 1.0));
        assert!(all_won.win_rate_ci_note().unwrap().contains("same outcome"));
        assert!(all_won.text().contains("no width"));
        let few = judged(&[1.0, 0.0, 1.0], 0);
        assert!(few.win_rate_ci_note().unwrap().contains("fewer than 20"));
        let mixed: Vec<f64> = (0..40).map(|i| (i % 3 == 0) as u8 as f64).collect();
        assert_eq!(judged(&mixed, 0).win_rate_ci_note(), None);
        assert!(judged(&mixed, 0).to_json()["win_rate_ci_note"].is_null());
    }

    /// A judge with no opinion on a pair neither agrees nor is silent about it.
    #[test]
    fn pairs_the_reward_model_scores_equal_are_counted() {
        let mixed: Vec<f64> = (0..40).map(|i| (i % 3 == 0) as u8 as f64).collect();
        let j = judged(&mixed, 10);
        assert_eq!(j.reward_model_accuracy, 0.75);
        assert_eq!(j.to_json()["reward_model_ties"], 10);
        assert!(j.text().contains("10 scored equal"), "{}", j.text());
        assert!(!judged(&mixed, 0).text().contains("scored equal"));
    }
}

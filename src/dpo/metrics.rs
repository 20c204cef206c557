//! Training metrics under TRL's names (`rewards/chosen`, `rewards/accuracies`, …), averaged over the
//! micro-batches of a step as TRL averages its per-micro-batch means.

use super::loss::{LossOutput, PairLogps};
use serde_json::{Map, Value};

/// The metrics a run logs, under TRL's names: the one list the trainer, `metrics.jsonl`, the
/// plots and the tests use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Loss,
    RewardsChosen,
    RewardsRejected,
    RewardsAccuracies,
    RewardsMargins,
    LogpsChosen,
    LogpsRejected,
    GradNorm,
    LearningRate,
    TokensPerSecond,
}

impl Metric {
    /// The per-pair means a micro-batch adds, in `metrics.jsonl`'s order.
    pub const PAIR_MEANS: [Metric; 7] = [
        Metric::Loss,
        Metric::RewardsChosen,
        Metric::RewardsRejected,
        Metric::RewardsAccuracies,
        Metric::RewardsMargins,
        Metric::LogpsChosen,
        Metric::LogpsRejected,
    ];

    /// What `refdpo plot` draws, in this order.
    pub const PLOTTED: [Metric; 9] = [
        Metric::Loss,
        Metric::RewardsAccuracies,
        Metric::RewardsMargins,
        Metric::RewardsChosen,
        Metric::RewardsRejected,
        Metric::LogpsChosen,
        Metric::LogpsRejected,
        Metric::GradNorm,
        Metric::LearningRate,
    ];

    /// TRL's name (`eval/` + it for evaluation lines).
    pub fn name(self) -> &'static str {
        match self {
            Metric::Loss => "loss",
            Metric::RewardsChosen => "rewards/chosen",
            Metric::RewardsRejected => "rewards/rejected",
            Metric::RewardsAccuracies => "rewards/accuracies",
            Metric::RewardsMargins => "rewards/margins",
            Metric::LogpsChosen => "logps/chosen",
            Metric::LogpsRejected => "logps/rejected",
            Metric::GradNorm => "grad_norm",
            Metric::LearningRate => "learning_rate",
            Metric::TokensPerSecond => "tokens_per_second",
        }
    }
}

/// A step's per-pair means averaged over its micro-batches (as TRL averages its per-micro-batch
/// means), or an evaluation's per-pair means over the whole split (each micro-batch weighted by
/// its pairs, as transformers' `eval_loss`).
#[derive(Debug, Default, Clone)]
pub struct MetricsAccumulator {
    /// One weighted sum per [`Metric::PAIR_MEANS`] entry (empty before the first micro-batch).
    sums: Vec<f64>,
    /// The sum of the weights: micro-batches, or pairs.
    weight: f64,
    batches: usize,
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

impl MetricsAccumulator {
    /// Adds one micro-batch's means, weighing as much as any other micro-batch (a training step).
    pub fn add(&mut self, out: &LossOutput, x: &PairLogps) {
        self.add_weighted(out, x, 1.0);
    }

    /// Adds one micro-batch's means weighted by its pairs, so that the result is the mean over
    /// every pair of all micro-batches, whatever their sizes (an evaluation).
    pub fn add_pairs(&mut self, out: &LossOutput, x: &PairLogps) {
        self.add_weighted(out, x, out.chosen_rewards.len() as f64);
    }

    fn add_weighted(&mut self, out: &LossOutput, x: &PairLogps, weight: f64) {
        let acc: Vec<f64> = out
            .chosen_rewards
            .iter()
            .zip(&out.rejected_rewards)
            .map(|(c, r)| if c > r { 1.0 } else { 0.0 })
            .collect();
        let margins: Vec<f64> = out
            .chosen_rewards
            .iter()
            .zip(&out.rejected_rewards)
            .map(|(c, r)| c - r)
            .collect();
        let values = [
            out.loss,
            mean(&out.chosen_rewards),
            mean(&out.rejected_rewards),
            mean(&acc),
            mean(&margins),
            mean(&x.policy_chosen),
            mean(&x.policy_rejected),
        ];
        if self.sums.is_empty() {
            self.sums = vec![0.0; values.len()];
        }
        for (slot, v) in self.sums.iter_mut().zip(values) {
            *slot += weight * v;
        }
        self.weight += weight;
        self.batches += 1;
    }

    /// Adds another accumulator's micro-batches (a logging window over several steps: TRL
    /// averages every metric over the micro-batches since its last log line).
    pub fn merge(&mut self, other: &MetricsAccumulator) {
        if self.sums.is_empty() {
            self.sums = vec![0.0; other.sums.len()];
        }
        for (slot, v) in self.sums.iter_mut().zip(&other.sums) {
            *slot += v;
        }
        self.weight += other.weight;
        self.batches += other.batches;
    }

    /// No micro-batch added yet.
    pub fn is_empty(&self) -> bool {
        self.batches == 0
    }

    fn divisor(&self) -> f64 {
        if self.weight > 0.0 {
            self.weight
        } else {
            1.0
        }
    }

    /// The mean of one of [`Metric::PAIR_MEANS`] (NaN before any micro-batch, or for a metric
    /// that is not a per-pair mean).
    pub fn get(&self, metric: Metric) -> f64 {
        Metric::PAIR_MEANS
            .iter()
            .position(|&m| m == metric)
            .and_then(|i| self.sums.get(i))
            .map(|v| v / self.divisor())
            .unwrap_or(f64::NAN)
    }

    /// The averaged metrics as a JSON object, names prefixed with `prefix` (`""` or `"eval/"`).
    pub fn to_json(&self, prefix: &str) -> Map<String, Value> {
        Metric::PAIR_MEANS
            .iter()
            .zip(&self.sums)
            .map(|(m, v)| {
                (
                    format!("{prefix}{}", m.name()),
                    Value::from(v / self.divisor()),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(chosen_logps: &[f64]) -> (LossOutput, PairLogps) {
        let n = chosen_logps.len();
        let x = PairLogps {
            policy_chosen: chosen_logps.to_vec(),
            policy_rejected: vec![-10.0; n],
            ref_chosen: vec![-10.0; n],
            ref_rejected: vec![-10.0; n],
            chosen_len: vec![1.0; n],
            rejected_len: vec![1.0; n],
            chosen_scored_tokens: n as f64,
        };
        let out = LossOutput {
            loss: chosen_logps.iter().sum::<f64>() / n as f64,
            losses: chosen_logps.to_vec(),
            chosen_rewards: vec![0.0; n],
            rejected_rewards: vec![0.0; n],
            grad_chosen: vec![0.0; n],
            grad_rejected: vec![0.0; n],
        };
        (out, x)
    }

    #[test]
    fn steps_average_micro_batches_and_evaluations_average_pairs() {
        let (a, xa) = batch(&[-1.0, -3.0, -5.0]);
        let (b, xb) = batch(&[-8.0]);
        let mut step = MetricsAccumulator::default();
        step.add(&a, &xa);
        step.add(&b, &xb);
        // TRL: the mean of the micro-batches' means.
        assert_eq!(step.get(Metric::LogpsChosen), (-3.0 + -8.0) / 2.0);
        let mut eval = MetricsAccumulator::default();
        eval.add_pairs(&a, &xa);
        eval.add_pairs(&b, &xb);
        // transformers' eval_loss: the mean over the pairs, whatever the micro-batch sizes.
        assert_eq!(eval.get(Metric::LogpsChosen), -17.0 / 4.0);
        assert_eq!(eval.get(Metric::Loss), -17.0 / 4.0);
        assert_eq!(eval.to_json("eval/")["eval/loss"], -17.0 / 4.0);
    }
}

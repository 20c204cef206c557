//! Training metrics under TRL's names (`rewards/chosen`, `rewards/accuracies`, …), averaged over the
//! micro-batches of a step as TRL averages its per-micro-batch means.

use super::loss::{LossOutput, PairLogps};
use serde_json::{Map, Value};

#[derive(Debug, Default, Clone)]
pub struct MetricsAccumulator {
    sums: Vec<(&'static str, f64)>,
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
    /// Adds one micro-batch's means.
    pub fn add(&mut self, out: &LossOutput, x: &PairLogps) {
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
            ("loss", out.loss),
            ("rewards/chosen", mean(&out.chosen_rewards)),
            ("rewards/rejected", mean(&out.rejected_rewards)),
            ("rewards/accuracies", mean(&acc)),
            ("rewards/margins", mean(&margins)),
            ("logps/chosen", mean(&x.policy_chosen)),
            ("logps/rejected", mean(&x.policy_rejected)),
        ];
        if self.sums.is_empty() {
            self.sums = values.iter().map(|(k, _)| (*k, 0.0)).collect();
        }
        for (slot, (_, v)) in self.sums.iter_mut().zip(values) {
            slot.1 += v;
        }
        self.batches += 1;
    }

    pub fn get(&self, name: &str) -> f64 {
        self.sums
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v / self.batches.max(1) as f64)
            .unwrap_or(f64::NAN)
    }

    /// The averaged metrics as a JSON object, names prefixed with `prefix` (`""` or `"eval/"`).
    pub fn to_json(&self, prefix: &str) -> Map<String, Value> {
        self.sums
            .iter()
            .map(|(k, v)| {
                (
                    format!("{prefix}{k}"),
                    Value::from(v / self.batches.max(1) as f64),
                )
            })
            .collect()
    }
}

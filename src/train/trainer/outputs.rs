//! The end of a run's parts: the evaluation on the test split, checkpoints, `final/` and the
//! summary line.

use super::Trainer;
use crate::dirs::RunDir;
use crate::dpo::{Metric, MetricsAccumulator};
use crate::error::Result;
use crate::train::batches;
use crate::train::checkpoint;
use crate::train::metrics_log::EvalReport;
use crate::train::split::Split;

impl Trainer<'_> {
    /// The policy on the test split (cached reference log-probs; fused, graph-free kernels): its
    /// means and the tokens it scored.
    fn evaluate(&self, split: &Split) -> Result<(MetricsAccumulator, usize)> {
        let mut metrics = MetricsAccumulator::default();
        let mut tokens = 0;
        for idx in batches::eval_batches(&split.lengths, self.cfg.train.batch_size) {
            let mb = self.micro_batch(split, &idx, true)?;
            let x = mb.pair_logps(&self.policy.score(&mb.seqs)?);
            metrics.add_pairs(&self.loss.loss(&x)?, &x);
            tokens += mb.tokens;
        }
        Ok((metrics, tokens))
    }

    /// Evaluates on the test split, if there is one, and appends the `eval/` line.
    pub(super) fn evaluate_and_log(&self) -> Result<Option<MetricsAccumulator>> {
        let Some(test) = &self.test else {
            return Ok(None);
        };
        let start = std::time::Instant::now();
        let (m, tokens) = self.evaluate(test)?;
        let loss = m.get(Metric::Loss);
        if !m.is_empty() && !loss.is_finite() {
            return Err(self.diverged_at(
                self.state.global_step,
                &format!("the evaluation loss is {loss} (the weights overflow the forward)"),
                "lower train.learning_rate",
            ));
        }
        let report = EvalReport {
            epoch: self.epoch(),
            tokens,
            seconds: start.elapsed().as_secs_f64(),
        };
        self.log.append_eval(self.state.global_step, &m, &report)?;
        Ok(Some(m))
    }

    pub(super) fn save(&mut self, dir: &std::path::Path) -> Result<()> {
        // Weights an update overflowed (the loss and norm checked before it were finite) are
        // never saved: a checkpoint is always a good one.
        if let Some(name) = self.policy.first_non_finite()? {
            return Err(self.diverged_at(
                self.state.global_step,
                &format!("the update made `{name}` NaN or Inf (nothing of it is saved)"),
                "lower train.learning_rate (or train.weight_decay)",
            ));
        }
        let base = checkpoint::Base {
            dir: &self.model_dir,
            id: &self.cfg.model.id,
            revision: &self.cfg.model.revision,
        };
        let settings = self.cfg.to_toml();
        checkpoint::save(
            dir,
            &self.policy,
            &self.optim,
            &self.state,
            &base,
            &settings,
        )?;
        self.last_checkpoint = Some(dir.to_path_buf());
        Ok(())
    }

    /// The final evaluation, `final/`, and the one-paragraph summary.
    pub(super) fn finish(mut self) -> Result<String> {
        let t = &self.cfg.train;
        let mut summary = format!(
            "trained {} steps into {}",
            self.state.global_step,
            t.out.display()
        );
        if self.last_train.is_empty() {
            summary.push_str("; no step left to train after the checkpoint");
        } else {
            summary.push_str(&format!(
                "; last train loss {:.4}, rewards/accuracies {:.3}",
                self.last_train.get(Metric::Loss),
                self.last_train.get(Metric::RewardsAccuracies)
            ));
        }
        if let Some(m) = self.evaluate_and_log()? {
            summary.push_str(&format!(
                "; eval loss {:.4}, eval/rewards/accuracies {:.3} on {} pairs",
                m.get(Metric::Loss),
                m.get(Metric::RewardsAccuracies),
                self.test.as_ref().map_or(0, Split::len)
            ));
        }
        if t.save_final {
            let final_dir = RunDir::new(&t.out).final_dir();
            self.save(&final_dir)?;
            summary.push_str(&format!("; final policy in {}", final_dir.display()));
        } else {
            summary.push_str("; final policy not saved (train.save_final = false)");
        }
        summary.push_str(&format!("; metrics in {}; ", self.log.path().display()));
        summary.push_str(&self.memory_summary());
        Ok(summary)
    }

    /// Persistent training bytes per model parameter, by part.
    fn memory_summary(&self) -> String {
        let t = &self.cfg.train;
        let trained = self.policy.num_params() as f64;
        let (grads, moments) = (self.grad_bytes as f64, self.optim.bytes() as f64);
        let state = t.state_dtype.as_str();
        let kept = match t.optim {
            crate::config::Optim::AdamwTorch => state,
            crate::config::Optim::Adamw8bit => "8-bit",
        };
        if self.policy.lora.is_none() {
            let weights = self.policy.bytes() as f64;
            return format!(
                "persistent training state {:.1} bytes/parameter ({} weights {:.1}, {state} \
                 gradients {:.1}, {kept} AdamW moments {:.1})",
                (weights + grads + moments) / trained,
                t.master_dtype.as_str(),
                weights / trained,
                grads / trained,
                moments / trained,
            );
        }
        let base = self.policy.frozen_params() as f64;
        let frozen = self.policy.frozen_bytes() as f64;
        format!(
            "LoRA: {} adapter parameters ({:.3}% of {} base parameters); persistent training \
             state {:.2} bytes/base parameter (frozen base {:.2}, f32 adapters, {state} gradients, \
             {kept} AdamW moments {:.2})",
            trained,
            100.0 * trained / base,
            base,
            (frozen + trained * 4.0 + grads + moments) / base,
            frozen / base,
            (trained * 4.0 + grads + moments) / base,
        )
    }
}

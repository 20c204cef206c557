//! When things happen in a run: how many optimizer steps it takes, which steps write a log line,
//! and each micro-batch's LoRA dropout seed.

/// Optimizer steps of a run over `pairs` training pairs: `max_steps`, else every epoch's
/// micro-batches grouped by `grad_accum` (a partial group is a step; at least one per epoch).
pub(super) fn total_steps(pairs: usize, t: &crate::config::TrainConfig) -> usize {
    if t.max_steps > 0 {
        return t.max_steps;
    }
    let per_epoch = pairs.div_ceil(t.batch_size).div_ceil(t.grad_accum).max(1);
    t.epochs.saturating_mul(per_epoch)
}

/// Whether step `step` of `last` writes a `metrics.jsonl` line: every `every`-th, as TRL's
/// `logging_steps` (transformers' `logging_first_step` is off), and the last.
pub(super) fn logs_at(step: usize, every: usize, last: usize) -> bool {
    step.is_multiple_of(every) || step == last
}

/// The LoRA dropout seed of one micro-batch: a function of the run's seed and its place in the run.
pub(super) fn lora_dropout_seed(seed: u64, step: usize, micro: usize) -> u64 {
    crate::model::init::fnv1a64(&format!("lora-dropout/{seed}/{step}/{micro}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_logging_and_dropout_seeds() {
        let mut t = crate::config::TrainConfig {
            batch_size: 16,
            grad_accum: 2,
            epochs: 2,
            max_steps: 0,
            ..Default::default()
        };
        // 160 pairs: 10 micro-batches, 5 steps an epoch; 161 pairs: a partial micro-batch too
        assert_eq!(total_steps(160, &t), 10);
        assert_eq!(total_steps(161, &t), 12);
        assert_eq!(total_steps(0, &t), 2, "at least one step an epoch");
        t.max_steps = 3;
        assert_eq!(total_steps(160, &t), 3);
        t.max_steps = 0;
        t.epochs = usize::MAX;
        assert_eq!(total_steps(160, &t), usize::MAX, "saturates, no overflow");
        let logged: Vec<usize> = (1..=10).filter(|&s| logs_at(s, 4, 10)).collect();
        assert_eq!(logged, [4, 8, 10]);
        let seeds: std::collections::HashSet<u64> = (0..4)
            .flat_map(|step| (0..4).map(move |micro| lora_dropout_seed(42, step, micro)))
            .collect();
        assert_eq!(seeds.len(), 16, "a seed per micro-batch");
        assert_eq!(lora_dropout_seed(42, 1, 2), lora_dropout_seed(42, 1, 2));
        assert_ne!(lora_dropout_seed(42, 1, 2), lora_dropout_seed(43, 1, 2));
    }
}

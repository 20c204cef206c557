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

/// Where a run stands after `step` optimizer steps over epochs of `batches` micro-batches, taken
/// `grad_accum` at a time (a step never spans two epochs): (epoch, micro-batches of it done). An
/// epoch's end is (that epoch, `batches`), as the loop leaves it before it turns to the next.
pub(super) fn place(step: usize, batches: usize, grad_accum: usize) -> (usize, usize) {
    let per_epoch = batches.div_ceil(grad_accum).max(1);
    match (step / per_epoch, step % per_epoch) {
        (0, 0) => (0, 0),
        (epoch, 0) => (epoch - 1, batches),
        (epoch, k) => (epoch, (k * grad_accum).min(batches)),
    }
}

/// A place with an epoch's end written as the next epoch's start: the two are one place.
pub(super) fn same_place(a: (usize, usize), b: (usize, usize), batches: usize) -> bool {
    let norm = |(e, k): (usize, usize)| {
        if k == batches {
            (e.saturating_add(1), 0)
        } else {
            (e, k)
        }
    };
    norm(a) == norm(b)
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

    /// The place after each step, against a replay of the trainer's loop (`next_batch` and the
    /// group that never spans two epochs).
    #[test]
    fn place_follows_the_loop() {
        for (batches, grad_accum) in [(10, 1), (10, 3), (10, 10), (10, 16), (1, 1), (7, 2)] {
            let (mut epoch, mut done) = (0, 0);
            for step in 1..=40 {
                let left = match batches - done.min(batches) {
                    0 => batches,
                    n => n,
                };
                for _ in 0..grad_accum.min(left) {
                    if done >= batches {
                        epoch += 1;
                        done = 0;
                    }
                    done += 1;
                }
                let want = (epoch, done);
                assert_eq!(
                    place(step, batches, grad_accum),
                    want,
                    "{batches} {grad_accum} {step}"
                );
            }
        }
        assert_eq!(place(0, 10, 3), (0, 0));
        assert!(same_place((0, 10), (1, 0), 10));
        assert!(!same_place((0, 9), (1, 0), 10));
        assert!(!same_place((1, 10), (1, 0), 10));
        // past the epoch's end is no place
        assert!(!same_place((0, 11), (1, 0), 10));
        assert!(!same_place((0, usize::MAX), (1, 0), 10));
    }
}

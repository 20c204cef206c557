//! Data order: a seeded shuffle per epoch, then length bucketing (sort within windows of many
//! batches, shuffle the batches) so padding stays small while the order stays random.

use crate::rng::SplitMix;

/// Batches (lists of pair indices) of one epoch; a pure function of (lengths, batch size, seed, epoch).
pub fn epoch_batches(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: usize,
) -> Vec<Vec<usize>> {
    let mut rng = SplitMix::new(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    rng.shuffle(&mut order);
    let window = batch_size.saturating_mul(32);
    let mut batches = Vec::new();
    for w in order.chunks_mut(window) {
        w.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(w.chunks(batch_size).map(<[usize]>::to_vec));
    }
    rng.shuffle(&mut batches);
    batches
}

/// Evaluation batches: all rows in order of length (no shuffling).
pub fn eval_batches(lengths: &[usize], batch_size: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    order.chunks(batch_size).map(<[usize]>::to_vec).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_complete_and_bucketed() {
        let lengths: Vec<usize> = (0..100).map(|i| (i * 37) % 50).collect();
        let a = epoch_batches(&lengths, 4, 42, 0);
        assert_eq!(a, epoch_batches(&lengths, 4, 42, 0));
        assert_ne!(a, epoch_batches(&lengths, 4, 42, 1));
        let mut all: Vec<usize> = a.concat();
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        for b in &a {
            assert!(b.windows(2).all(|w| lengths[w[0]] >= lengths[w[1]]));
        }
    }
}

//! A tiny seeded RNG (splitmix64): the demo generator and the training data order, reproducible
//! across platforms and versions.

use crate::model::init::uniform;

pub struct SplitMix {
    seed: u64,
    i: u64,
}

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        Self { seed, i: 0 }
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        self.i += 1;
        (uniform(self.seed, self.i) + 1.0) / 2.0
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.unit() * n as f64) as usize).min(n - 1)
    }

    pub fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }

    /// Fisher–Yates.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

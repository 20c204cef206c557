//! A tiny seeded RNG (splitmix64): the demo generator, the training data order, seeded weights and
//! dropout masks, reproducible across platforms and versions (the fixtures' Python reproduces
//! `uniform` and `fnv1a64`). A leaf.

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

pub fn fnv1a64(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The i-th (1-based) splitmix64 output of `seed`, as f64 in [-1, 1).
pub fn uniform(seed: u64, i: u64) -> f64 {
    (bits(seed, i) >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
}

/// The i-th (1-based) splitmix64 output of `seed`: 64 random bits.
pub fn bits(seed: u64, i: u64) -> u64 {
    let mut z = seed.wrapping_add(i.wrapping_mul(GOLDEN));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

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

//! exp over f32 slices in SIMD lanes: the softmax and log-sum-exp of the CPU's scoring forward
//! spent 8% of its cycles in libm's scalar `expf` (BENCHMARKS.md, "Stage one with a real model
//! on the CPU"). Cephes' `expf` polynomial (within 2 ulp of the exact value; tested against
//! `f32::exp`), written branch-free so the compiler vectorizes it, and compiled three times
//! (AVX-512, AVX2 + FMA, the baseline) with the same operations in the same order: the result does
//! not depend on which one the CPU runs.

/// Lanes of the sums: fixed, so the order of additions is the same on every CPU.
const LANES: usize = 16;

/// exp(x) for one value, in the operations the slices' loops vectorize.
#[inline(always)]
fn exp1(x: f32) -> f32 {
    const HI: f32 = 88.376_26; // ln(f32::MAX) rounded down
    const LO: f32 = -87.336_55; // ln(f32::MIN_POSITIVE): below it, 0 (no subnormals)
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    const LN2_HI: f32 = 0.693_359_4; // ln 2 split so that n · LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    let c = x.clamp(LO, HI);
    let n = (c * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = c - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * (r * r) + r + 1.0;
    // n is an integer in [-126, 128) here: 2^n by its exponent bits
    let pow2 = f32::from_bits(((n as i32 + 127) << 23) as u32);
    let v = y * pow2;
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        v // NaN stays NaN
    }
}

/// xs[i] ← exp(xs[i] − shift); returns Σ xs after, summed in `LANES` f64 lanes ([`lane_sum`]).
#[inline(always)]
fn exp_shifted_sum_body(xs: &mut [f32], shift: f32) -> f32 {
    for x in xs.iter_mut() {
        *x = exp1(*x - shift);
    }
    lane_sum(xs)
}

/// Σ xs in `LANES` f64 lanes, rounded once to f32. In f32 lanes a sum over a vocabulary (3,072
/// terms a lane for 49,152 tokens) lost the terms below half an ulp of its running total: every
/// row's log-sum-exp came out low, so every cached log-prob high (by 1e-3 nats over 400 tokens
/// of the real SmolLM2-135M, 10 times transformers' own f32 error, always the same way).
#[inline(always)]
fn lane_sum(xs: &[f32]) -> f32 {
    let mut acc = [0f64; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += f64::from(*x);
        }
    }
    for (a, x) in acc.iter_mut().zip(chunks.remainder()) {
        *a += f64::from(*x);
    }
    acc.iter().sum::<f64>() as f32
}

#[inline(always)]
fn max_body(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a = if *x > *a { *x } else { *a };
        }
    }
    for (a, x) in acc.iter_mut().zip(chunks.remainder()) {
        *a = if *x > *a { *x } else { *a };
    }
    acc.iter()
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

dispatch!(exp_shifted_sum, exp_shifted_sum_body, (xs: &mut [f32], shift: f32) -> f32);
dispatch!(max, max_body, (xs: &[f32]) -> f32);

/// Σ exp(x − shift) over xs, xs untouched (the log-sum-exp of a row of logits), in the lanes
/// and order of [`exp_shifted_sum`].
#[inline(always)]
fn sum_exp_shifted_body(xs: &[f32], shift: f32) -> f32 {
    let mut acc = [0f64; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += f64::from(exp1(*x - shift));
        }
    }
    for (a, x) in acc.iter_mut().zip(chunks.remainder()) {
        *a += f64::from(exp1(*x - shift));
    }
    acc.iter().sum::<f64>() as f32
}

dispatch!(sum_exp_shifted, sum_exp_shifted_body, (xs: &[f32], shift: f32) -> f32);

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm_and_exact_at_the_edges() {
        let mut worst = 0;
        let mut x = -87.0f32;
        while x < 88.0 {
            let mut v = [x];
            exp_shifted_sum(&mut v, 0.0);
            worst = worst.max(ulps(v[0], x.exp()));
            x += 0.001_37;
        }
        assert!(worst <= 2, "{worst} ulp");
        let mut edges = [f32::NEG_INFINITY, -1e4, 0.0, 1e4, f32::NAN];
        let sum = exp_shifted_sum(&mut edges, 0.0);
        assert_eq!(&edges[..4], &[0.0, 0.0, 1.0, f32::INFINITY]);
        assert!(edges[4].is_nan() && sum.is_nan());
    }

    #[test]
    fn sums_and_maxima_of_ragged_slices() {
        for n in [0, 1, 15, 16, 17, 100, 1000] {
            let xs: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let m = max(&xs);
            let want_max = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(m, want_max, "n={n}");
            let want: f64 = xs.iter().map(|&x| ((x - m) as f64).exp()).sum();
            let got = sum_exp_shifted(&xs, m) as f64;
            let mut copy = xs.clone();
            assert_eq!(
                exp_shifted_sum(&mut copy, m) as f64,
                got,
                "n={n}: the same sum"
            );
            assert!(
                (got - want).abs() <= 1e-6 * want.max(1.0),
                "n={n}: {got} vs {want}"
            );
        }
    }

    /// A vocabulary's row: one likely token and 49,151 each below half an ulp of 1. Summed in
    /// f32 lanes, the lane holding the 1 dropped its 3,071 small terms (the sum 9e-5 low); the
    /// f64 lanes keep them.
    #[test]
    fn a_long_sum_keeps_the_terms_below_half_an_ulp_of_its_total() {
        let mut xs = vec![(3e-8f64).ln() as f32; 49_152];
        xs[0] = 0.0;
        let want: f64 = xs.iter().map(|&x| f64::from(x).exp()).sum();
        for got in [
            sum_exp_shifted(&xs, 0.0),
            exp_shifted_sum(&mut xs.clone(), 0.0),
        ] {
            let rel = (f64::from(got) - want).abs() / want;
            assert!(rel < 2e-7, "{got} vs {want}: {rel:.1e}");
        }
    }
}

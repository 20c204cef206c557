//! CPU kernels of the scoring forward, beside candle's ops: [`attention`] (a whole attention per
//! block of queries) and [`logits`] (log-probs and log-sum-exp per row of logits) and [`exp`]
//! (exp over f32 slices in SIMD lanes).

pub mod attention;
pub mod exp;
pub mod logits;

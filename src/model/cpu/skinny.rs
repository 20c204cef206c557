//! A few rows against a weight matrix on the CPU: y = x·Wᵀ for x [m, k] with m ≤ [`MAX_ROWS`] and
//! W [n, k], as a decoding step's projections and its `lm_head` are (8 rows against up to 49,152
//! weight rows).
//!
//! gemm is built for large products: at m = 8 it packs W before every product and its small-m
//! kernels ran at 2.8–11.5 GB/s of W where torch's reached 13–20 GB/s (BENCHMARKS.md, "Decoding
//! on the CPU"). Here each weight row is read once, straight from the model's memory, against all
//! m input rows held in the cache: m dot products in SIMD lanes per weight row, the rows of W
//! spread over the threads. A decoding step reads every weight of the model once, so this is a
//! memory-bound loop and its speed is the memory's.

use super::SharedOut;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

/// The most rows [`linear`] takes; above it gemm's packed kernels are faster.
pub const MAX_ROWS: usize = 16;

/// Lanes of the dot products: fixed, so the order of additions is the same on every CPU.
const LANES: usize = 16;

/// Weight rows per task: enough to amortize a task, few enough to spread a 576-row projection.
const COLUMNS: usize = 32;

/// Whether [`linear`] takes x against w: both f32 on the CPU, neither tracked for a gradient (it
/// has no backward), at most [`MAX_ROWS`] rows of x, unless `REFDPO_FUSED=0`.
pub fn covers(x: &Tensor, w: &Tensor) -> bool {
    let rows = match x.dims().split_last() {
        Some((&k, lead)) if k > 0 => lead.iter().product::<usize>(),
        _ => return false,
    };
    x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && w.rank() == 2
        && rows <= MAX_ROWS
        && !x.track_op()
        && !w.track_op()
        && !crate::model::fused::disabled()
}

/// x [.., k] (f32, CPU) against W [n, k] → x·Wᵀ [.., n].
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, k) = w.dims2()?;
    let dims = x.dims();
    if dims.last() != Some(&k) {
        return Err(Error::Model(format!(
            "skinny product: input {dims:?} against weight [{n}, {k}]"
        )));
    }
    let m = x.elem_count() / k.max(1);
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (xs, ws) = match (&*xs, &*ws) {
        (Storage::Cpu(xs), Storage::Cpu(ws)) => (
            &xs.as_slice::<f32>()?[xl.start_offset()..][..m * k],
            &ws.as_slice::<f32>()?[wl.start_offset()..][..n * k],
        ),
        _ => {
            return Err(Error::Model(
                "skinny product: a tensor is not on the CPU".into(),
            ))
        }
    };
    let mut y = vec![0f32; m * n];
    if k > 0 && m > 0 {
        let dst = SharedOut(y.as_mut_ptr());
        ws.par_chunks(COLUMNS * k)
            .enumerate()
            .for_each_init(Vec::new, |yt, (task, w)| {
                // the task's outputs weight row by weight row (yᵀ), then into y's rows
                let cols = w.len() / k;
                yt.clear();
                yt.resize(cols * m, 0.0);
                columns(xs, k, w, yt);
                for i in 0..m {
                    for (c, col) in yt.chunks_exact(m).enumerate() {
                        // SAFETY: y[i][task·COLUMNS + c] is within y, and this task alone writes
                        // columns task·COLUMNS..task·COLUMNS + cols; y outlives the loop.
                        unsafe { *dst.at(i * n + task * COLUMNS + c) = col[i] };
                    }
                }
            });
    }
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("x has a last dimension") = n;
    Ok(Tensor::from_vec(y, shape, &Device::Cpu)?)
}

/// The lanes of one dot product added up, the tail past the whole lanes first.
#[inline(always)]
fn finish(mut lanes: [f32; LANES], x: &[f32], w: &[f32]) -> f32 {
    let whole = x.len() / LANES * LANES;
    for ((a, x), w) in lanes.iter_mut().zip(&x[whole..]).zip(&w[whole..]) {
        *a = x.mul_add(*w, *a);
    }
    lanes.iter().sum()
}

/// out[c·m + i] = x_i · w_c for the weight rows w_c of `w` ([cols, k]) and x [m, k]: in AVX-512
/// or AVX2 registers where the CPU has them (written with intrinsics, so that a dev build, whose
/// crate is optimized at level 1 and not vectorized by the compiler, runs them too), else in
/// plain loops. Each fuses every product into its lane's sum (IEEE's fma, one rounding) in the
/// same order: the same bits.
fn columns(x: &[f32], k: usize, w: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("fma") {
            // SAFETY: the CPU has the features the function was compiled for.
            return unsafe { x86::columns_avx512(x, k, w, out) };
        }
        if has!("avx2") && has!("fma") {
            // SAFETY: as above.
            return unsafe { x86::columns_avx2(x, k, w, out) };
        }
    }
    columns_body(x, k, w, out)
}

/// [`columns`] in plain loops, the rows of x in groups of 8, 4, 2 and 1.
fn columns_body(x: &[f32], k: usize, w: &[f32], out: &mut [f32]) {
    let m = x.len() / k;
    let mut i = 0;
    while i < m {
        let r = match m - i {
            8.. => 8,
            4..=7 => 4,
            2 | 3 => 2,
            _ => 1,
        };
        match r {
            8 => rows::<8>(x, i, k, w, out, m),
            4 => rows::<4>(x, i, k, w, out, m),
            2 => rows::<2>(x, i, k, w, out, m),
            _ => rows::<1>(x, i, k, w, out, m),
        }
        i += r;
    }
}

/// Rows i0..i0 + R of x against every weight row of `w`: R dot products per weight row, each in
/// `LANES` lane sums.
#[inline(always)]
fn rows<const R: usize>(x: &[f32], i0: usize, k: usize, w: &[f32], out: &mut [f32], m: usize) {
    let xs: [&[f32]; R] = std::array::from_fn(|r| &x[(i0 + r) * k..(i0 + r + 1) * k]);
    for (c, wr) in w.chunks_exact(k).enumerate() {
        let mut acc = [[0f32; LANES]; R];
        // each chunk of the weight row against the R rows: R independent sums in flight
        for ch in 0..k / LANES {
            let wv = lanes(wr, ch);
            for (a, xr) in acc.iter_mut().zip(&xs) {
                // by value: the compiler keeps the lanes in vector registers
                let xv = lanes(xr, ch);
                *a = std::array::from_fn(|l| xv[l].mul_add(wv[l], a[l]));
            }
        }
        for (r, (a, xr)) in acc.into_iter().zip(&xs).enumerate() {
            out[c * m + i0 + r] = finish(a, xr, wr);
        }
    }
}

/// Chunk `ch` of `LANES` values of xs.
#[inline(always)]
fn lanes(xs: &[f32], ch: usize) -> [f32; LANES] {
    let mut v = [0f32; LANES];
    v.copy_from_slice(&xs[ch * LANES..(ch + 1) * LANES]);
    v
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{finish, LANES};
    use std::arch::x86_64::*;

    /// [`super::columns`] with each row's 16 lanes in one AVX-512 register, the rows of x in
    /// groups of 8 and 1.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn columns_avx512(x: &[f32], k: usize, w: &[f32], out: &mut [f32]) {
        let m = x.len() / k;
        let mut i = 0;
        while i + 8 <= m {
            rows_avx512::<8>(x, i, k, w, out, m);
            i += 8;
        }
        while i < m {
            rows_avx512::<1>(x, i, k, w, out, m);
            i += 1;
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    fn rows_avx512<const R: usize>(
        x: &[f32],
        i0: usize,
        k: usize,
        w: &[f32],
        out: &mut [f32],
        m: usize,
    ) {
        let xs: [&[f32]; R] = std::array::from_fn(|r| &x[(i0 + r) * k..(i0 + r + 1) * k]);
        for (c, wr) in w.chunks_exact(k).enumerate() {
            let mut acc = [_mm512_setzero_ps(); R];
            for at in (0..k / LANES * LANES).step_by(LANES) {
                // SAFETY: at + 16 ≤ k, the length of wr and of every row in xs.
                unsafe {
                    let wv = _mm512_loadu_ps(wr.as_ptr().add(at));
                    for r in 0..R {
                        acc[r] =
                            _mm512_fmadd_ps(_mm512_loadu_ps(xs[r].as_ptr().add(at)), wv, acc[r]);
                    }
                }
            }
            for r in 0..R {
                let mut lanes = [0f32; LANES];
                // SAFETY: lanes holds 16 values.
                unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc[r]) };
                out[c * m + i0 + r] = finish(lanes, xs[r], wr);
            }
        }
    }

    /// [`super::columns`] with each row's 16 lanes in two AVX registers, the rows of x in groups
    /// of 4 and 1 (8 accumulators, the weights' two and an input's: the 16 registers hold them).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn columns_avx2(x: &[f32], k: usize, w: &[f32], out: &mut [f32]) {
        let m = x.len() / k;
        let mut i = 0;
        while i + 4 <= m {
            rows_avx2::<4>(x, i, k, w, out, m);
            i += 4;
        }
        while i < m {
            rows_avx2::<1>(x, i, k, w, out, m);
            i += 1;
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn rows_avx2<const R: usize>(
        x: &[f32],
        i0: usize,
        k: usize,
        w: &[f32],
        out: &mut [f32],
        m: usize,
    ) {
        let xs: [&[f32]; R] = std::array::from_fn(|r| &x[(i0 + r) * k..(i0 + r + 1) * k]);
        for (c, wr) in w.chunks_exact(k).enumerate() {
            let (mut lo, mut hi) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
            for at in (0..k / LANES * LANES).step_by(LANES) {
                // SAFETY: at + 16 ≤ k, the length of wr and of every row in xs.
                unsafe {
                    let w0 = _mm256_loadu_ps(wr.as_ptr().add(at));
                    let w1 = _mm256_loadu_ps(wr.as_ptr().add(at + 8));
                    for r in 0..R {
                        let p = xs[r].as_ptr().add(at);
                        lo[r] = _mm256_fmadd_ps(_mm256_loadu_ps(p), w0, lo[r]);
                        hi[r] = _mm256_fmadd_ps(_mm256_loadu_ps(p.add(8)), w1, hi[r]);
                    }
                }
            }
            for r in 0..R {
                let mut lanes = [0f32; LANES];
                // SAFETY: lanes holds 16 values.
                unsafe {
                    _mm256_storeu_ps(lanes.as_mut_ptr(), lo[r]);
                    _mm256_storeu_ps(lanes.as_mut_ptr().add(8), hi[r]);
                }
                out[c * m + i0 + r] = finish(lanes, xs[r], wr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// x·Wᵀ in f64.
    fn reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum();
            }
        }
        y
    }

    #[test]
    fn few_rows_equal_the_product_in_f64_and_candles_matmul() {
        // every SIMD version this CPU has and the plain loops: the same bits (9 rows: groups
        // of 8 or 4, and 1)
        let (x, w): (Vec<f32>, Vec<f32>) = (
            (0..9 * 37).map(|i| (i as f32).sin()).collect(),
            (0..5 * 37).map(|i| (i as f32).cos()).collect(),
        );
        let mut plain = vec![0f32; 45];
        columns_body(&x, 37, &w, &mut plain);
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let mut fast = vec![0f32; 45];
            if has!("avx512f") && has!("fma") {
                // SAFETY: the CPU has the features.
                unsafe { x86::columns_avx512(&x, 37, &w, &mut fast) };
                assert_eq!(fast, plain, "AVX-512");
            }
            if has!("avx2") && has!("fma") {
                // SAFETY: as above.
                unsafe { x86::columns_avx2(&x, 37, &w, &mut fast) };
                assert_eq!(fast, plain, "AVX2");
            }
        }
        let dev = Device::Cpu;
        // ragged k (a tail past the lanes), n past one task's columns, every row grouping
        for (m, k, n) in [
            (1, 7, 3),
            (3, 40, 70),
            (8, 576, 100),
            (13, 33, 65),
            (16, 64, 32),
        ] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919 % 211) as f32 - 105.0) / 53.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 104_729 % 307) as f32 - 153.0) / 97.0)
                .collect();
            let xt = Tensor::from_vec(x.clone(), (1, m, k), &dev).unwrap();
            let wt = Tensor::from_vec(w.clone(), (n, k), &dev).unwrap();
            assert!(covers(&xt, &wt));
            let got: Vec<f32> = linear(&xt, &wt)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let candle: Vec<f32> = xt
                .squeeze(0)
                .unwrap()
                .matmul(&wt.t().unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want = reference(&x, &w, m, k, n);
            for ((g, c), w) in got.iter().zip(&candle).zip(&want) {
                let tol = 1e-5 * w.abs().max(1.0);
                assert!((*g as f64 - w).abs() < tol, "{m}x{k}x{n}: {g} vs {w}");
                assert!(
                    (*c as f64 - w).abs() < tol,
                    "{m}x{k}x{n}: candle {c} vs {w}"
                );
            }
        }
    }

    #[test]
    fn a_narrowed_weight_is_read_at_its_offset_and_large_or_tracked_inputs_are_refused() {
        let dev = Device::Cpu;
        let fused = Tensor::arange(0f32, 60.0, &dev)
            .unwrap()
            .reshape((6, 10))
            .unwrap();
        let w = fused.narrow(0, 2, 3).unwrap();
        let x = Tensor::ones((2, 10), DType::F32, &dev).unwrap();
        let got: Vec<Vec<f32>> = linear(&x, &w).unwrap().to_vec2().unwrap();
        // row j of the narrowed weight holds 10·(j + 2) .. 10·(j + 2) + 9
        let want: Vec<f32> = (2..5)
            .map(|j| (0..10).map(|t| (10 * j + t) as f32).sum())
            .collect();
        assert_eq!(got, vec![want.clone(), want]);
        let many = Tensor::ones((MAX_ROWS + 1, 10), DType::F32, &dev).unwrap();
        assert!(!covers(&many, &w));
        let tracked = candle_core::Var::ones((2, 10), DType::F32, &dev).unwrap();
        assert!(!covers(tracked.as_tensor(), &w));
        let bad = Tensor::ones((2, 9), DType::F32, &dev).unwrap();
        assert!(linear(&bad, &w)
            .unwrap_err()
            .to_string()
            .contains("[3, 10]"));
    }
}

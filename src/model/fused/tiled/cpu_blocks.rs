//! The tiled op on the CPU in f32, the way the kernels tile it: one task per (batch row, kv head,
//! sequence), each of its query heads' blocks of 64 queries against the keys they see, every
//! product a small gemm (no [T, T] tensor, no candle op between the steps). The backward
//! recomputes each block's probabilities from the saved log-sum-exp (FlashAttention-2's
//! algorithm); a task owns its kv head's dK and dV rows, so tasks never write the same element.
//!
//! What training runs on the CPU (f32) in place of the composed attention and its autograd; the
//! plain loops of [`super::cpu`] stay the reference it is tested against.

use super::cpu::Dims;
use super::op::Params;
use crate::model::cpu::exp;
use crate::model::fused::elem::Elem;
use rayon::prelude::*;

/// Queries per block.
const BLOCK: usize = 64;

/// A row-major (or strided) matrix operand: its elements and (column, row) strides.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    cs: usize,
    rs: usize,
}

impl<'a> Mat<'a> {
    /// Rows `stride` elements apart (the row's width when packed).
    fn rows(data: &'a [f32], stride: usize) -> Self {
        Self {
            data,
            cs: 1,
            rs: stride,
        }
    }

    /// The transpose of a matrix whose rows are `stride` elements apart.
    fn t(data: &'a [f32], stride: usize) -> Self {
        Self {
            data,
            cs: stride,
            rs: 1,
        }
    }
}

/// `rows` rows of `d` elements from `at`, `stride` apart.
fn rows_at(x: &[f32], at: usize, rows: usize, d: usize, stride: usize) -> &[f32] {
    &x[at..at + extent(rows, d, 1, stride)]
}

/// The packed rows of `src` (`d` elements each) into `dst` from `at`, `stride` apart.
fn scatter(dst: &mut [f32], at: usize, stride: usize, src: &[f32], d: usize) {
    if stride == d {
        dst[at..at + src.len()].copy_from_slice(src);
        return;
    }
    for (r, row) in src.chunks_exact(d).enumerate() {
        dst[at + r * stride..][..d].copy_from_slice(row);
    }
}

/// The last element a (rows × cols) matrix of these strides reaches, plus one.
fn extent(rows: usize, cols: usize, cs: usize, rs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// dst (m × n, row-major of width n) ← [dst +] beta · lhs (m × k) · rhs (k × n), on this thread.
fn mm((m, n, k): (usize, usize, usize), dst: &mut [f32], acc: bool, lhs: Mat, rhs: Mat, beta: f32) {
    assert!(extent(m, n, 1, n) <= dst.len(), "gemm: dst too short");
    assert!(
        extent(m, k, lhs.cs, lhs.rs) <= lhs.data.len(),
        "gemm: lhs too short"
    );
    assert!(
        extent(k, n, rhs.cs, rhs.rs) <= rhs.data.len(),
        "gemm: rhs too short"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    // SAFETY: the asserts above keep every element gemm addresses within the three slices;
    // dst is borrowed mutably, apart from the operands.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            acc,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            if acc { 1.0 } else { 0.0 },
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// One task: batch row, kv head, and its sequence's [start, start + len) positions.
#[derive(Debug, Clone, Copy)]
struct Task {
    b: usize,
    kvh: usize,
    start: usize,
    len: usize,
}

fn tasks(n: Dims, lens: Option<&[usize]>) -> Vec<Task> {
    let spans: Vec<(usize, usize)> = match lens {
        Some(lens) => lens
            .iter()
            .scan(0, |at, &len| {
                *at += len;
                Some((*at - len, len))
            })
            .filter(|&(_, len)| len > 0)
            .collect(),
        None => vec![(0, n.t)],
    };
    (0..n.b)
        .flat_map(|b| {
            let spans = &spans;
            (0..n.hkv).flat_map(move |kvh| {
                spans
                    .iter()
                    .map(move |&(start, len)| Task { b, kvh, start, len })
            })
        })
        .collect()
}

/// A block of queries [i0, i0 + rows) (positions in the row) and the keys [klo, khi) any of them
/// sees.
struct Block {
    i0: usize,
    rows: usize,
    klo: usize,
    khi: usize,
}

impl Params {
    /// The first key query `i` of a sequence starting at `start` sees.
    fn first_key(&self, i: usize, start: usize) -> usize {
        if self.window > 0 && i + 1 > start + self.window {
            i + 1 - self.window
        } else {
            start
        }
    }
}

fn blocks(task: Task, p: &Params) -> impl Iterator<Item = Block> + '_ {
    (0..task.len).step_by(BLOCK).map(move |r0| {
        let i0 = task.start + r0;
        let rows = BLOCK.min(task.len - r0);
        Block {
            i0,
            rows,
            klo: p.first_key(i0, task.start),
            khi: i0 + rows,
        }
    })
}

/// The block's capped scores (q's block and k's block transposed) (tanh kept in `tanh` for the backward, when capped), masked to
/// -inf where a query does not see a key: [rows × keys] in `s`.
fn scores(
    (s, tanh): (&mut Vec<f32>, &mut Vec<f32>),
    (qb, kb): (Mat, Mat),
    blk: &Block,
    task: Task,
    p: &Params,
    d: usize,
) {
    let keys = blk.khi - blk.klo;
    s.clear();
    s.resize(blk.rows * keys, 0.0);
    mm((blk.rows, keys, d), s, false, qb, kb, p.scale);
    if let Some(cap) = p.softcap {
        tanh.clear();
        tanh.extend(s.iter().map(|x| (x / cap).tanh()));
        for (x, t) in s.iter_mut().zip(tanh.iter()) {
            *x = cap * t;
        }
    }
    for (r, row) in s.chunks_exact_mut(keys).enumerate() {
        let i = blk.i0 + r;
        let lo = p.first_key(i, task.start);
        for (c, x) in row.iter_mut().enumerate() {
            let j = blk.klo + c;
            if j > i || j < lo {
                *x = f32::NEG_INFINITY;
            }
        }
    }
}

/// (o [B, Hq, T, D], lse [Hq, B·T]), as [`super::cpu::forward`] for f32.
pub fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: Dims,
    p: &Params,
    lens: Option<&[usize]>,
) -> (Vec<f32>, Vec<f32>) {
    let d = n.d;
    let g = n.hq / n.hkv;
    let (qs, ks) = (n.position_stride(n.hq), n.position_stride(n.hkv));
    let work = tasks(n, lens);
    // per task: o of its query heads' rows [g × len × d], their lse [g × len]
    let parts: Vec<(Vec<f32>, Vec<f32>)> = work
        .par_iter()
        .map(|&task| {
            let (mut o, mut lse) = (vec![0f32; g * task.len * d], vec![0f32; g * task.len]);
            let (mut s, mut tanh) = (Vec::new(), Vec::new());
            let kv_at = |j: usize| n.row(n.hkv, task.b, task.kvh, j) * d;
            for hi in 0..g {
                let h = task.kvh * g + hi;
                for blk in blocks(task, p) {
                    let q_at = n.row(n.hq, task.b, h, blk.i0) * d;
                    let qb = rows_at(q, q_at, blk.rows, d, qs);
                    let keys = blk.khi - blk.klo;
                    let ka = kv_at(blk.klo);
                    let (kb, vb) = (rows_at(k, ka, keys, d, ks), rows_at(v, ka, keys, d, ks));
                    let qk = (Mat::rows(qb, qs), Mat::t(kb, ks));
                    scores((&mut s, &mut tanh), qk, &blk, task, p, d);
                    for (r, row) in s.chunks_exact_mut(keys).enumerate() {
                        let m = exp::max(row);
                        let sum = exp::exp_shifted_sum(row, m);
                        let inv = 1.0 / sum;
                        for x in row.iter_mut() {
                            *x *= inv;
                        }
                        lse[hi * task.len + blk.i0 - task.start + r] = m + sum.ln();
                    }
                    let at = (hi * task.len + blk.i0 - task.start) * d;
                    mm(
                        (blk.rows, d, keys),
                        &mut o[at..at + blk.rows * d],
                        false,
                        Mat::rows(&s, keys),
                        Mat::rows(vb, ks),
                        1.0,
                    );
                }
            }
            (o, lse)
        })
        .collect();
    let mut o = vec![0f32; q.len()];
    let mut lse = vec![0f32; n.hq * n.b * n.t];
    for (task, (to, tl)) in work.iter().zip(parts) {
        for hi in 0..g {
            let h = task.kvh * g + hi;
            let at = n.row(n.hq, task.b, h, task.start) * d;
            scatter(&mut o, at, qs, &to[hi * task.len * d..][..task.len * d], d);
            let at = h * n.b * n.t + task.b * n.t + task.start;
            lse[at..at + task.len].copy_from_slice(&tl[hi * task.len..][..task.len]);
        }
    }
    (o, lse)
}

/// (dq, dk, dv), as [`super::cpu::backward`] for f32.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    grad: &[f32],
    lse: &[f32],
    n: Dims,
    p: &Params,
    lens: Option<&[usize]>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = n.d;
    let g = n.hq / n.hkv;
    let (qs, ks) = (n.position_stride(n.hq), n.position_stride(n.hkv));
    let work = tasks(n, lens);
    // per task: dq of its query heads' rows [g × len × d], dk and dv of its kv rows [len × d]
    type Part = (Vec<f32>, Vec<f32>, Vec<f32>);
    let parts: Vec<Part> = work
        .par_iter()
        .map(|&task| {
            let mut dq = vec![0f32; g * task.len * d];
            let (mut dk, mut dv) = (vec![0f32; task.len * d], vec![0f32; task.len * d]);
            let (mut s, mut tanh, mut dp) = (Vec::new(), Vec::new(), Vec::new());
            let kv_at = |j: usize| n.row(n.hkv, task.b, task.kvh, j) * d;
            for hi in 0..g {
                let h = task.kvh * g + hi;
                for blk in blocks(task, p) {
                    let q_at = n.row(n.hq, task.b, h, blk.i0) * d;
                    let at = |x| rows_at(x, q_at, blk.rows, d, qs);
                    let (qb, gb, ob) = (at(q), at(grad), at(o));
                    let keys = blk.khi - blk.klo;
                    let ka = kv_at(blk.klo);
                    let (kb, vb) = (rows_at(k, ka, keys, d, ks), rows_at(v, ka, keys, d, ks));
                    let qk = (Mat::rows(qb, qs), Mat::t(kb, ks));
                    scores((&mut s, &mut tanh), qk, &blk, task, p, d);
                    // P = exp(s − lse)
                    for (r, row) in s.chunks_exact_mut(keys).enumerate() {
                        let l = lse[h * n.b * n.t + task.b * n.t + blk.i0 + r];
                        exp::exp_shifted_sum(row, l);
                    }
                    // dV[keys] += Pᵀ · dO
                    let (ra, rz) = ((blk.klo - task.start) * d, (blk.khi - task.start) * d);
                    mm(
                        (keys, d, blk.rows),
                        &mut dv[ra..rz],
                        true,
                        Mat::t(&s, keys),
                        Mat::rows(gb, qs),
                        1.0,
                    );
                    // dP = dO · Vᵀ; dS = P ∘ (dP − delta) ∘ cap'
                    dp.clear();
                    dp.resize(blk.rows * keys, 0.0);
                    mm(
                        (blk.rows, keys, d),
                        &mut dp,
                        false,
                        Mat::rows(gb, qs),
                        Mat::t(vb, ks),
                        1.0,
                    );
                    for (r, (dp_row, p_row)) in dp
                        .chunks_exact_mut(keys)
                        .zip(s.chunks_exact(keys))
                        .enumerate()
                    {
                        let (gr, or) = (&gb[r * qs..][..d], &ob[r * qs..][..d]);
                        let delta: f32 = gr.iter().zip(or).map(|(a, b)| a * b).sum();
                        for (x, pr) in dp_row.iter_mut().zip(p_row) {
                            *x = pr * (*x - delta);
                        }
                        if p.softcap.is_some() {
                            for (x, t) in dp_row.iter_mut().zip(&tanh[r * keys..][..keys]) {
                                *x *= 1.0 - t * t;
                            }
                        }
                    }
                    // dQ = dS · K · scale; dK[keys] += dSᵀ · Q · scale
                    let at = (hi * task.len + blk.i0 - task.start) * d;
                    mm(
                        (blk.rows, d, keys),
                        &mut dq[at..at + blk.rows * d],
                        false,
                        Mat::rows(&dp, keys),
                        Mat::rows(kb, ks),
                        p.scale,
                    );
                    mm(
                        (keys, d, blk.rows),
                        &mut dk[ra..rz],
                        true,
                        Mat::t(&dp, keys),
                        Mat::rows(qb, qs),
                        p.scale,
                    );
                }
            }
            (dq, dk, dv)
        })
        .collect();
    let mut dq = vec![0f32; q.len()];
    let (mut dk, mut dv) = (vec![0f32; k.len()], vec![0f32; v.len()]);
    for (task, (tq, tk, tv)) in work.iter().zip(parts) {
        for hi in 0..g {
            let h = task.kvh * g + hi;
            let at = n.row(n.hq, task.b, h, task.start) * d;
            scatter(&mut dq, at, qs, &tq[hi * task.len * d..][..task.len * d], d);
        }
        let at = n.row(n.hkv, task.b, task.kvh, task.start) * d;
        scatter(&mut dk, at, ks, &tk, d);
        scatter(&mut dv, at, ks, &tv, d);
    }
    (dq, dk, dv)
}

/// The CPU's tiled attention for an element type: f32 (what training runs) in these blocks, the
/// half types in [`super::cpu`]'s loops.
pub trait CpuTiled: Elem {
    fn forward(
        q: &[Self],
        k: &[Self],
        v: &[Self],
        n: Dims,
        p: &Params,
        lens: Option<&[usize]>,
    ) -> (Vec<Self>, Vec<f32>);

    #[allow(clippy::too_many_arguments)]
    fn backward(
        q: &[Self],
        k: &[Self],
        v: &[Self],
        o: &[Self],
        grad: &[Self],
        lse: &[f32],
        n: Dims,
        p: &Params,
        lens: Option<&[usize]>,
    ) -> (Vec<Self>, Vec<Self>, Vec<Self>);
}

macro_rules! cpu_tiled {
    ($t:ty, $forward:path, $backward:path) => {
        impl CpuTiled for $t {
            fn forward(
                q: &[$t],
                k: &[$t],
                v: &[$t],
                n: Dims,
                p: &Params,
                lens: Option<&[usize]>,
            ) -> (Vec<$t>, Vec<f32>) {
                $forward(q, k, v, n, p, lens)
            }

            fn backward(
                q: &[$t],
                k: &[$t],
                v: &[$t],
                o: &[$t],
                grad: &[$t],
                lse: &[f32],
                n: Dims,
                p: &Params,
                lens: Option<&[usize]>,
            ) -> (Vec<$t>, Vec<$t>, Vec<$t>) {
                $backward(q, k, v, o, grad, lse, n, p, lens)
            }
        }
    };
}
cpu_tiled!(f32, forward, backward);
cpu_tiled!(half::bf16, super::cpu::forward, super::cpu::backward);
cpu_tiled!(half::f16, super::cpu::forward, super::cpu::backward);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fused::tiled::cpu::{self, Order};

    fn values(len: usize, seed: u64) -> Vec<f32> {
        (0..len as u64)
            .map(|i| crate::model::init::uniform(seed, i + 1) as f32)
            .collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// The blocks equal the reference loops, forward and every gradient: padded rows and packed
    /// sequences across block edges, GQA, a window, the soft cap.
    #[test]
    fn blocks_equal_the_loops() {
        let cases: [(Dims, Option<Vec<usize>>, Params); 4] = [
            (
                Dims {
                    b: 2,
                    hq: 4,
                    hkv: 2,
                    t: 150,
                    d: 16,
                    order: Order::Bhtd,
                },
                None,
                Params {
                    scale: 0.25,
                    window: 0,
                    softcap: None,
                },
            ),
            (
                Dims {
                    b: 1,
                    hq: 6,
                    hkv: 2,
                    t: 200,
                    d: 8,
                    order: Order::Bhtd,
                },
                Some(vec![70, 1, 129]),
                Params {
                    scale: 0.3,
                    window: 0,
                    softcap: None,
                },
            ),
            (
                Dims {
                    b: 1,
                    hq: 2,
                    hkv: 1,
                    t: 160,
                    d: 8,
                    order: Order::Bhtd,
                },
                Some(vec![100, 60]),
                Params {
                    scale: 0.3,
                    window: 37,
                    softcap: None,
                },
            ),
            (
                Dims {
                    b: 2,
                    hq: 2,
                    hkv: 2,
                    t: 90,
                    d: 8,
                    order: Order::Bhtd,
                },
                None,
                Params {
                    scale: 0.5,
                    window: 0,
                    softcap: Some(2.0),
                },
            ),
        ];
        let orders = [Order::Bhtd, Order::Bthd];
        for (case, (n, lens, p)) in cases.iter().enumerate() {
            for order in orders {
                let n = Dims { order, ..*n };
                let case = format!("{case} {order:?}");
                blocks_equal_the_loops_in(&case, n, lens.as_deref(), p);
            }
        }
    }

    fn blocks_equal_the_loops_in(case: &str, n: Dims, lens: Option<&[usize]>, p: &Params) {
        let qn = n.b * n.hq * n.t * n.d;
        let kn = n.b * n.hkv * n.t * n.d;
        let (q, k, v, g) = (values(qn, 1), values(kn, 2), values(kn, 3), values(qn, 4));
        let (o, lse) = forward(&q, &k, &v, n, p, lens);
        let (ro, rlse) = cpu::forward::<f32>(&q, &k, &v, n, p, lens);
        assert!(
            max_diff(&o, &ro) < 1e-5,
            "case {case}: o {}",
            max_diff(&o, &ro)
        );
        assert!(max_diff(&lse, &rlse) < 1e-5, "case {case}: lse");
        let got = backward(&q, &k, &v, &o, &g, &lse, n, p, lens);
        let want = cpu::backward::<f32>(&q, &k, &v, &ro, &g, &rlse, n, p, lens);
        for (what, a, b) in [
            ("dq", &got.0, &want.0),
            ("dk", &got.1, &want.1),
            ("dv", &got.2, &want.2),
        ] {
            let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(
                max_diff(a, b) < 1e-5 * scale.max(1.0),
                "case {case}: {what} {}",
                max_diff(a, b)
            );
        }
    }
}

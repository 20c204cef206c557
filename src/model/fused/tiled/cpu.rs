//! The tiled op's attention on the CPU, in plain loops: what the kernels compute (f32 dots and
//! softmax, Gemma 2's cap, the mask), one row at a time. It is how the op's forward, backward and
//! the decoder's use of it are tested without a GPU; the kernels themselves are checked by
//! Triton's interpreter.
//!
//! Tensors are contiguous, [B, H, T, D] or [B, T, H, D] ([`Order`]); the log-sum-exp is f32
//! [Hq, B·T] as the kernels write it.

use super::op::Params;
use crate::model::fused::elem::Elem;
use rayon::prelude::*;

/// Where the heads axis sits in q, k, v and o (the head dim last and contiguous either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    /// [B, H, T, D]: each head's positions together.
    #[default]
    Bhtd,
    /// [B, T, H, D]: each position's heads together, as a projection's output [B, T, H·D]
    /// reshapes to, with no transpose (`host.py`'s "bthd").
    Bthd,
}

/// The attention's shape: batch, query heads, kv heads, positions, head size, and the order of
/// the axes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub b: usize,
    pub hq: usize,
    pub hkv: usize,
    pub t: usize,
    pub d: usize,
    pub order: Order,
}

impl Dims {
    fn groups(&self) -> usize {
        self.hq / self.hkv
    }

    /// The row (of `d` elements) holding position `i` of head `h` in batch row `b`, in a tensor
    /// of `heads` heads.
    pub fn row(&self, heads: usize, b: usize, h: usize, i: usize) -> usize {
        match self.order {
            Order::Bhtd => (b * heads + h) * self.t + i,
            Order::Bthd => (b * self.t + i) * heads + h,
        }
    }

    /// (b, h, i) of row `r` in a tensor of `heads` heads: [`Self::row`]'s inverse.
    pub fn unrow(&self, heads: usize, r: usize) -> (usize, usize, usize) {
        match self.order {
            Order::Bhtd => (r / (heads * self.t), r / self.t % heads, r % self.t),
            Order::Bthd => (r / (heads * self.t), r % heads, r / heads % self.t),
        }
    }

    /// Elements between one position's row and the next in a tensor of `heads` heads.
    pub fn position_stride(&self, heads: usize) -> usize {
        match self.order {
            Order::Bhtd => self.d,
            Order::Bthd => heads * self.d,
        }
    }

    /// Offset of position `i` of query head `h` in sequence `b`.
    fn q_row(&self, b: usize, h: usize, i: usize) -> usize {
        self.row(self.hq, b, h, i) * self.d
    }

    /// Offset of position `j` of kv head `h` in sequence `b`.
    fn kv_row(&self, b: usize, h: usize, j: usize) -> usize {
        self.row(self.hkv, b, h, j) * self.d
    }

    /// The log-sum-exp's index of (b, h, i): [Hq, B·T].
    fn stat(&self, b: usize, h: usize, i: usize) -> usize {
        h * self.b * self.t + b * self.t + i
    }
}

fn dot<T: Elem>(a: &[T], b: &[T]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x.f() * y.f()).sum()
}

/// Each position's sequence within its batch row: [start, end) of positions.
struct Spans(Vec<(usize, usize)>);

impl Spans {
    /// One sequence per row of `t` positions, or packed sequences of `lens` (summing to `t`).
    fn new(t: usize, lens: Option<&[usize]>) -> Self {
        Spans(match lens {
            None => vec![(0, t); t],
            Some(lens) => {
                let mut at = 0;
                lens.iter()
                    .flat_map(|&len| {
                        at += len;
                        std::iter::repeat_n((at - len, at), len)
                    })
                    .collect()
            }
        })
    }
}

impl Params {
    /// Keys [lo, i] that query i sees, in its sequence.
    fn keys(&self, i: usize, sp: &Spans) -> std::ops::RangeInclusive<usize> {
        let start = sp.0[i].0;
        let lo = if self.window > 0 && i + 1 > start + self.window {
            i + 1 - self.window
        } else {
            start
        };
        lo..=i
    }

    /// Queries [j, hi) that see key j, in its sequence.
    fn queries(&self, j: usize, sp: &Spans) -> std::ops::Range<usize> {
        let end = sp.0[j].1;
        let hi = if self.window > 0 {
            (j + self.window).min(end)
        } else {
            end
        };
        j..hi
    }

    /// The scaled, capped score of a query row against a key row, and tanh for the backward.
    fn score<T: Elem>(&self, q: &[T], k: &[T]) -> (f32, f32) {
        let s = dot(q, k) * self.scale;
        match self.softcap {
            Some(cap) => {
                let t = (s / cap).tanh();
                (cap * t, t)
            }
            None => (s, 0.0),
        }
    }

    /// d score / d (q·k·scale): 1, or 1 − tanh² under the cap.
    fn cap_grad(&self, t: f32) -> f32 {
        if self.softcap.is_some() {
            1.0 - t * t
        } else {
            1.0
        }
    }
}

/// (o [B, Hq, T, D] in `n.order`, lse [Hq, B·T]).
pub fn forward<T: Elem>(
    q: &[T],
    k: &[T],
    v: &[T],
    n: Dims,
    p: &Params,
    lens: Option<&[usize]>,
) -> (Vec<T>, Vec<f32>) {
    let sp = Spans::new(n.t, lens);
    let mut o = vec![T::zero(); q.len()];
    // (b, h, i) of each row of o, in memory order
    let rows: Vec<(usize, usize, usize)> =
        (0..n.b * n.hq * n.t).map(|r| n.unrow(n.hq, r)).collect();
    let lse_rows: Vec<f32> = o
        .par_chunks_mut(n.d)
        .zip(rows.par_iter())
        .map(|(out, &(b, h, i))| {
            let qi = &q[n.q_row(b, h, i)..][..n.d];
            let kvh = h / n.groups();
            let s: Vec<f32> = p
                .keys(i, &sp)
                .map(|j| p.score(qi, &k[n.kv_row(b, kvh, j)..][..n.d]).0)
                .collect();
            let m = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let lse = m + s.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
            let mut acc = vec![0f32; n.d];
            for (j, sj) in p.keys(i, &sp).zip(&s) {
                let w = (sj - lse).exp();
                for (a, x) in acc.iter_mut().zip(&v[n.kv_row(b, kvh, j)..][..n.d]) {
                    *a += w * x.f();
                }
            }
            for (y, a) in out.iter_mut().zip(acc) {
                *y = T::of(a);
            }
            lse
        })
        .collect();
    let mut lse = vec![0f32; n.hq * n.b * n.t];
    for (&(b, h, i), l) in rows.iter().zip(lse_rows) {
        lse[n.stat(b, h, i)] = l;
    }
    (o, lse)
}

/// (dq, dk, dv) from the forward's output and log-sum-exp and the output's gradient.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Elem>(
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    g: &[T],
    lse: &[f32],
    n: Dims,
    p: &Params,
    lens: Option<&[usize]>,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let sp = Spans::new(n.t, lens);
    // delta = Σ_d o · do per row, as the kernels' first pass.
    let delta: Vec<f32> = o
        .par_chunks(n.d)
        .zip(g.par_chunks(n.d))
        .map(|(a, b)| dot(a, b))
        .collect();
    let row = |b: usize, h: usize, i: usize| n.row(n.hq, b, h, i);
    // dS of (query row i of head h, key j): p · (dp − delta) · cap'.
    let ds = |b: usize, h: usize, i: usize, j: usize| -> (f32, f32) {
        let kvh = h / n.groups();
        let qi = &q[n.q_row(b, h, i)..][..n.d];
        let (s, t) = p.score(qi, &k[n.kv_row(b, kvh, j)..][..n.d]);
        let prob = (s - lse[n.stat(b, h, i)]).exp();
        let dp = dot(
            &g[n.q_row(b, h, i)..][..n.d],
            &v[n.kv_row(b, kvh, j)..][..n.d],
        );
        (prob, prob * (dp - delta[row(b, h, i)]) * p.cap_grad(t))
    };
    let mut dq = vec![T::zero(); q.len()];
    dq.par_chunks_mut(n.d).enumerate().for_each(|(r, out)| {
        let (b, h, i) = n.unrow(n.hq, r);
        let kvh = h / n.groups();
        let mut acc = vec![0f32; n.d];
        for j in p.keys(i, &sp) {
            let (_, d) = ds(b, h, i, j);
            for (a, x) in acc.iter_mut().zip(&k[n.kv_row(b, kvh, j)..][..n.d]) {
                *a += d * x.f();
            }
        }
        for (y, a) in out.iter_mut().zip(acc) {
            *y = T::of(a * p.scale);
        }
    });
    let mut dk = vec![T::zero(); k.len()];
    let mut dv = vec![T::zero(); v.len()];
    dk.par_chunks_mut(n.d)
        .zip(dv.par_chunks_mut(n.d))
        .enumerate()
        .for_each(|(r, (dk_row, dv_row))| {
            let (b, kvh, j) = n.unrow(n.hkv, r);
            let (mut ak, mut av) = (vec![0f32; n.d], vec![0f32; n.d]);
            for h in kvh * n.groups()..(kvh + 1) * n.groups() {
                for i in p.queries(j, &sp) {
                    let (prob, d) = ds(b, h, i, j);
                    let (qi, gi) = (&q[n.q_row(b, h, i)..][..n.d], &g[n.q_row(b, h, i)..][..n.d]);
                    for x in 0..n.d {
                        ak[x] += d * qi[x].f();
                        av[x] += prob * gi[x].f();
                    }
                }
            }
            for x in 0..n.d {
                dk_row[x] = T::of(ak[x] * p.scale);
                dv_row[x] = T::of(av[x]);
            }
        });
    (dq, dk, dv)
}

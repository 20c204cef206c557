//! The tiled attention as a candle custom op with its backward: the forward keeps each row's
//! log-sum-exp (f32 [Hq, B·T]) for the backward, which is one op writing dq, dk and dv into one
//! buffer (the kernels' delta, dK/dV and dQ passes on CUDA).

use super::cpu::{Dims, Order};
use super::cpu_blocks::CpuTiled;
use crate::model::fused::elem::{slice, with_float, Elem};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp3, Device, Layout, Result, Shape, Storage, Tensor, WithDType,
};
use std::sync::{Arc, Mutex};

const NAME: &str = "tiled attention";

/// The attention's constants: scale, sliding window (0 for none), Gemma 2's soft cap.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    pub scale: f32,
    /// Key j is seen from query i when i − window < j ≤ i; 0 for causal only.
    pub window: usize,
    pub softcap: Option<f32>,
}

/// softmax(mask(cap(q·kᵀ·scale)))·v for q [B, Hq, T, D] and k, v [B, Hkv, T, D] (Hkv dividing
/// Hq; K and V not repeated) → [B, Hq, T, D], differentiable in all three.
pub fn tiled_attention(q: &Tensor, k: &Tensor, v: &Tensor, params: Params) -> Result<Tensor> {
    tiled_attention_packed(q, k, v, params, None, Order::Bhtd)
}

/// [`tiled_attention`] with the axes in `order` (q [B, T, Hq, D] → o [B, T, Hq, D] in
/// [`Order::Bthd`]), of sequences packed end to end in one row (B = 1) when `lens` is given:
/// each attends within itself (causal and windowed from its own first token), in one launch of
/// each kernel (their sequence offsets), with no sequence's scores against another's.
pub fn tiled_attention_packed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    params: Params,
    lens: Option<Arc<[usize]>>,
    order: Order,
) -> Result<Tensor> {
    if let Some(lens) = &lens {
        packed_row(k, lens, order, "k")?;
    }
    let op = TiledAttention {
        params,
        lens,
        queries: None,
        order,
        lse: Mutex::new(None),
    };
    aligned(q)?.apply_op3(&aligned(k)?, &aligned(v)?, op)
}

/// [`tiled_attention_packed`] with fewer queries than keys: sequence s of `lens` keys (k and
/// v [1, Σ lens, Hkv, D] in [`Order::Bthd`]) has `queries[s]` queries, its last positions, on
/// the queries' own axis (q [1, Σ queries, Hq, D] → o of q's shape). A pair sharing its
/// prompt: the rejected sequence's keys are the whole sequence (the prompt's gathered from the
/// chosen one's), its queries only its own tokens, so no query is computed twice.
pub fn tiled_attention_shared(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    params: Params,
    (lens, queries): (Arc<[usize]>, Arc<[usize]>),
    order: Order,
) -> Result<Tensor> {
    packed_row(k, &lens, order, "k")?;
    packed_row(q, &queries, order, "q")?;
    if lens.len() != queries.len() || lens.iter().zip(queries.iter()).any(|(n, m)| m > n) {
        return Err(candle_core::Error::Msg(format!(
            "{NAME}: {} sequences' queries {queries:?} are not at most their {} sequences' keys {lens:?}",
            queries.len(),
            lens.len()
        )));
    }
    let op = TiledAttention {
        params,
        lens: Some(lens),
        queries: Some(queries),
        order,
        lse: Mutex::new(None),
    };
    aligned(q)?.apply_op3(&aligned(k)?, &aligned(v)?, op)
}

/// x [B, .., T, ..] in `order` is one packed row of `lens`: B = 1, T their sum.
fn packed_row(x: &Tensor, lens: &[usize], order: Order, what: &str) -> Result<()> {
    let (b, t) = match (order, x.dims4()?) {
        (Order::Bhtd, (b, _, t, _)) | (Order::Bthd, (b, t, _, _)) => (b, t),
    };
    let total: usize = lens.iter().sum();
    if b != 1 || total != t {
        return Err(candle_core::Error::Msg(format!(
            "{NAME}: packed sequences are one row of all of them: {what} [{b}, .., {t}, ..] against lengths summing to {total}"
        )));
    }
    Ok(())
}

/// `x` contiguous and starting on a 16-byte boundary, as the compiled kernels assume of every
/// pointer (a view into a larger buffer may not).
fn aligned(x: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    if !(x.layout().start_offset() * x.dtype().size_in_bytes()).is_multiple_of(16) {
        return x.copy();
    }
    Ok(x)
}

/// The composed attention the tiled op equals: K and V repeated to every query head, the scaled
/// scores (soft-capped), the causal or sliding-window mask, the softmax, the product with V; in
/// the inputs' dtype ([B, Hq, T, D] and [B, Hkv, T, D] → [B, Hq, T, D]).
pub fn composed_attention(q: &Tensor, k: &Tensor, v: &Tensor, p: Params) -> Result<Tensor> {
    let (_, hq, t, _) = q.dims4()?;
    let rep = hq / k.dim(1)?;
    let repeat = |x: &Tensor| -> Result<Tensor> {
        let (b, h, t, d) = x.dims4()?;
        x.unsqueeze(2)?
            .expand((b, h, rep, t, d))?
            .reshape((b, h * rep, t, d))
    };
    let mut s = (q.matmul(&repeat(k)?.t()?)? * f64::from(p.scale))?;
    if let Some(cap) = p.softcap {
        s = (crate::model::softcap::tanh_over(&s, f64::from(cap))? * f64::from(cap))?;
    }
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..t).map(move |j| {
                if j <= i && (p.window == 0 || i - j < p.window) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), q.device())?.to_dtype(s.dtype())?;
    let probs = candle_nn::ops::softmax(&s.broadcast_add(&mask)?, candle_core::D::Minus1)?;
    probs.matmul(&repeat(v)?)
}

struct TiledAttention {
    params: Params,
    /// Packed sequences' lengths (one row), or one sequence per batch row.
    lens: Option<Arc<[usize]>>,
    /// Each packed sequence's queries (its last positions), where fewer than its keys.
    queries: Option<Arc<[usize]>>,
    order: Order,
    /// The forward's log-sum-exp, for the backward.
    lse: Mutex<Option<Tensor>>,
}

/// The dims of k and v (`t` their positions) in `order`, and q's positions: the same, unless
/// the queries are `fewer`; checked against each other.
pub(super) fn dims(
    q: &Layout,
    k: &Layout,
    v: &Layout,
    order: Order,
    fewer: bool,
) -> Result<(Dims, usize)> {
    let bad = |why: String| candle_core::Error::Msg(format!("{NAME}: {why}"));
    let axes = |x: &Layout, what: &str| -> Result<[usize; 4]> {
        match (order, x.dims()) {
            (Order::Bhtd, &[b, h, t, d]) => Ok([b, h, t, d]),
            (Order::Bthd, &[b, t, h, d]) => Ok([b, h, t, d]),
            (_, other) => Err(bad(format!("{what} is {other:?}, not {order:?}"))),
        }
    };
    let [b, hq, t, d] = &axes(q, "q")?;
    let [kb, hkv, kt, kd] = &axes(k, "k")?;
    if (kb, kd) != (b, d)
        || (kt != t && !fewer)
        || v.dims() != k.dims()
        || *hkv == 0
        || hq % hkv != 0
    {
        return Err(bad(format!(
            "q {:?}, k {:?}, v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    let n = Dims {
        b: *b,
        hq: *hq,
        hkv: *hkv,
        t: *kt,
        d: *d,
        order,
    };
    Ok((n, *t))
}

impl TiledAttention {
    fn keep(&self, lse: Tensor) {
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
    }

    fn query_positions(&self) -> Option<Vec<usize>> {
        query_positions(self.lens.as_deref(), self.queries.as_deref())
    }
}

/// Where fewer queries than keys: each query's position on the keys' axis of the one packed row
/// (sequence s's queries its last `queries[s]` of `lens[s]` positions).
fn query_positions(lens: Option<&[usize]>, queries: Option<&[usize]>) -> Option<Vec<usize>> {
    let (lens, queries) = (lens?, queries?);
    let mut at = 0;
    let mut out = Vec::with_capacity(queries.iter().sum());
    for (&n, &m) in lens.iter().zip(queries) {
        out.extend(at + n - m..at + n);
        at += n;
    }
    Some(out)
}

/// The log-sum-exp's layout [Hq, T] as rows of one element in [`Order::Bhtd`].
fn stats(n: Dims) -> Dims {
    Dims {
        d: 1,
        hkv: n.hq,
        order: Order::Bhtd,
        ..n
    }
}

/// The element offsets of each query row on the queries' axis and of its position `at` on the
/// keys' axis of `n.t` positions (one packed row, `heads` heads of `n.d`).
fn query_rows(n: Dims, heads: usize, at: &[usize]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let nq = Dims { t: at.len(), ..n };
    (0..heads).flat_map(move |h| {
        at.iter()
            .enumerate()
            .map(move |(r, &p)| (nq.row(heads, 0, h, r) * n.d, n.row(heads, 0, h, p) * n.d))
    })
}

/// Rows of x on the queries' axis at their positions `at` on the keys' axis, `fill` elsewhere.
fn spread<T: Copy>(x: &[T], n: Dims, heads: usize, at: &[usize], fill: T) -> Vec<T> {
    let mut out = vec![fill; heads * n.t * n.d];
    for (q, k) in query_rows(n, heads, at) {
        out[k..k + n.d].copy_from_slice(&x[q..q + n.d]);
    }
    out
}

/// [`spread`]'s inverse: the rows at positions `at` of x on the keys' axis.
fn pick<T: Copy + Default>(x: &[T], n: Dims, heads: usize, at: &[usize]) -> Vec<T> {
    let mut out = vec![T::default(); heads * at.len() * n.d];
    for (q, k) in query_rows(n, heads, at) {
        out[q..q + n.d].copy_from_slice(&x[k..k + n.d]);
    }
    out
}

impl CustomOp3 for TiledAttention {
    fn name(&self) -> &'static str {
        "refdpo-tiled-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, tq) = dims(ql, kl, vl, self.order, self.queries.is_some())?;
        let at = self.query_positions();
        with_float!(q.dtype(), NAME, T => {
            let q = slice::<T>(NAME, q, ql)?;
            // fewer queries: each at its position among the keys, the others zero; their rows
            // of the output are dropped
            let whole = at.as_ref().map(|at| spread(q, n, n.hq, at, T::of(0.0)));
            let (o, lse) = <T as CpuTiled>::forward(
                whole.as_deref().unwrap_or(q),
                slice(NAME, k, kl)?,
                slice(NAME, v, vl)?,
                n,
                &self.params,
                self.lens.as_deref(),
            );
            let (o, lse) = match &at {
                Some(at) => (pick(&o, n, n.hq, at), pick(&lse, stats(n), n.hq, at)),
                None => (o, lse),
            };
            self.keep(Tensor::from_vec(lse, (n.hq, n.b * tq), &Device::Cpu)?);
            Ok((T::to_cpu_storage_owned(o), ql.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, tq) = dims(ql, kl, vl, self.order, self.queries.is_some())?;
        let x = super::cuda::Qkv {
            q,
            ql,
            k,
            kl,
            v,
            vl,
        };
        let queries = self
            .queries
            .as_deref()
            .map(|lens| super::cuda::Queries { lens, t: tq });
        let (o, lse) = super::cuda::forward(x, n, &self.params, self.lens.as_deref(), queries)?;
        self.keep(lse);
        Ok((o, ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self
            .lse
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| candle_core::Error::Msg(format!("{NAME}: backward before forward")))?;
        let back = TiledAttentionBackward {
            params: self.params,
            lens: self.lens.clone(),
            queries: self.queries.clone(),
            order: self.order,
            o: aligned(o)?,
            grad: aligned(grad)?,
            lse,
        };
        let packed = q.apply_op3_no_bwd(k, v, &back)?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        Ok((
            Some(packed.narrow(0, 0, nq)?.reshape(q.shape())?),
            Some(packed.narrow(0, nq, nk)?.reshape(k.shape())?),
            Some(packed.narrow(0, nq + nk, nk)?.reshape(v.shape())?),
        ))
    }
}

/// dq, dk and dv end to end in one flat buffer, from q, k, v and what the forward kept.
struct TiledAttentionBackward {
    params: Params,
    lens: Option<Arc<[usize]>>,
    queries: Option<Arc<[usize]>>,
    order: Order,
    o: Tensor,
    grad: Tensor,
    lse: Tensor,
}

/// A contiguous CPU tensor's elements, held while `f` reads them.
fn with_cpu<R>(t: &Tensor, f: impl FnOnce(&CpuStorage, &Layout) -> Result<R>) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(s) => f(s, l),
        _ => Err(candle_core::Error::Msg(format!(
            "{NAME}: backward's saved tensors are not on the CPU"
        ))),
    }
}

impl CustomOp3 for TiledAttentionBackward {
    fn name(&self) -> &'static str {
        "refdpo-tiled-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, _) = dims(ql, kl, vl, self.order, self.queries.is_some())?;
        let at = query_positions(self.lens.as_deref(), self.queries.as_deref());
        with_float!(q.dtype(), NAME, T => {
            let (dq, dk, dv) = with_cpu(&self.o, |os, ol| {
                with_cpu(&self.grad, |gs, gl| {
                    with_cpu(&self.lse, |ls, ll| {
                        let (q, o) = (slice::<T>(NAME, q, ql)?, slice::<T>(NAME, os, ol)?);
                        let (g, lse) = (slice::<T>(NAME, gs, gl)?, slice::<f32>(NAME, ls, ll)?);
                        // fewer queries: the others at their positions with no output gradient
                        // and an infinite log-sum-exp (probability 0), so they add nothing
                        let whole = at.as_ref().map(|at| {
                            let rows = |x| spread(x, n, n.hq, at, T::of(0.0));
                            (rows(q), rows(o), rows(g), spread(lse, stats(n), n.hq, at, f32::INFINITY))
                        });
                        let (q, o, g, lse) = match &whole {
                            Some((q, o, g, lse)) => (&q[..], &o[..], &g[..], &lse[..]),
                            None => (q, o, g, lse),
                        };
                        let (dq, dk, dv) = <T as CpuTiled>::backward(
                            q,
                            slice(NAME, k, kl)?,
                            slice(NAME, v, vl)?,
                            o,
                            g,
                            lse,
                            n,
                            &self.params,
                            self.lens.as_deref(),
                        );
                        let dq = match &at {
                            Some(at) => pick(&dq, n, n.hq, at),
                            None => dq,
                        };
                        Ok((dq, dk, dv))
                    })
                })
            })?;
            let len = dq.len() + dk.len() + dv.len();
            let mut all = dq;
            all.extend(dk);
            all.extend(dv);
            Ok((T::to_cpu_storage_owned(all), Shape::from(len)))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, tq) = dims(ql, kl, vl, self.order, self.queries.is_some())?;
        let queries = self
            .queries
            .as_deref()
            .map(|lens| super::cuda::Queries { lens, t: tq });
        let saved = super::cuda::Saved {
            o: &self.o,
            grad: &self.grad,
            lse: &self.lse,
        };
        let x = super::cuda::Qkv {
            q,
            ql,
            k,
            kl,
            v,
            vl,
        };
        let all = super::cuda::backward(x, saved, n, &self.params, self.lens.as_deref(), queries)?;
        Ok((
            all,
            Shape::from(ql.shape().elem_count() + 2 * kl.shape().elem_count()),
        ))
    }
}

#[cfg(test)]
mod tests;

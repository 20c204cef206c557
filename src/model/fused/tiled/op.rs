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
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;
    use candle_core::{DType, Var};

    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, p: Params) -> Tensor {
        composed_attention(q, k, v, p).unwrap()
    }

    #[test]
    fn forward_and_every_gradient_equal_the_composed_ops() {
        let dev = Device::Cpu;
        let cases = [
            (2, 4, 2, 9, 8, 0, None),
            (1, 4, 1, 13, 16, 5, None),
            (2, 2, 2, 11, 8, 0, Some(3.0)),
            (1, 6, 3, 10, 4, 4, Some(2.0)),
        ];
        for (b, hq, hkv, t, d, window, softcap) in cases {
            let p = Params {
                scale: (d as f32).powf(-0.5),
                window,
                softcap,
            };
            let var = |h| {
                Var::from_tensor(&Tensor::randn(0f32, 1.5, (b, h, t, d), &dev).unwrap()).unwrap()
            };
            let (q, k, v) = (var(hq), var(hkv), var(hkv));
            let up = Tensor::randn(0f32, 1.0, (b, hq, t, d), &dev).unwrap();
            let want = composed(&q, &k, &v, p);
            let got = tiled_attention(&q, &k, &v, p).unwrap();
            let what = format!("{b}x{hq}/{hkv}x{t}x{d} window {window} cap {softcap:?}");
            assert!(max_abs_diff(&want, &got) < 1e-5, "{what}");
            let gw = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let gg = (got * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let diff = max_abs_diff(gw.get(x).unwrap(), gg.get(x).unwrap());
                assert!(diff < 1e-5, "d{name} {what}: {diff}");
            }
        }
    }

    #[test]
    fn packed_sequences_equal_each_sequence_alone_forward_and_gradients() {
        let dev = Device::Cpu;
        let lens = [5usize, 1, 12, 7];
        let t: usize = lens.iter().sum();
        for (hq, hkv, window, softcap) in [(4, 2, 0, None), (6, 3, 4, Some(2.0)), (2, 1, 3, None)] {
            let p = Params {
                scale: 0.35,
                window,
                softcap,
            };
            let var = |h| {
                Var::from_tensor(&Tensor::randn(0f32, 1.5, (1, h, t, 8), &dev).unwrap()).unwrap()
            };
            let (q, k, v) = (var(hq), var(hkv), var(hkv));
            let up = Tensor::randn(0f32, 1.0, (1, hq, t, 8), &dev).unwrap();
            let packed =
                tiled_attention_packed(&q, &k, &v, p, Some(lens.into()), Order::Bhtd).unwrap();
            // each sequence alone through the composed ops, stitched back together
            let mut at = 0;
            let mut alone = Vec::new();
            for len in lens {
                let part = |x: &Tensor| x.narrow(2, at, len).unwrap();
                alone.push(composed(&part(&q), &part(&k), &part(&v), p));
                at += len;
            }
            let alone = Tensor::cat(&alone, 2).unwrap();
            let what = format!("{hq}/{hkv} window {window} cap {softcap:?}");
            assert!(max_abs_diff(&alone, &packed) < 1e-5, "{what}");
            let gw = (alone * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gg = (packed * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let diff = max_abs_diff(gw.get(x).unwrap(), gg.get(x).unwrap());
                assert!(diff < 1e-5, "d{name} {what}: {diff}");
            }
        }
        // lengths that are not the row are refused
        let x = Tensor::zeros((1, 2, 6, 8), DType::F32, &dev).unwrap();
        let p = Params {
            scale: 1.0,
            window: 0,
            softcap: None,
        };
        let e = tiled_attention_packed(&x, &x, &x, p, Some([2usize, 3].into()), Order::Bhtd)
            .unwrap_err()
            .to_string();
        assert!(e.contains("summing to 5"), "{e}");
    }

    #[test]
    fn positions_before_heads_equal_heads_before_positions_forward_and_gradients() {
        // [B, T, H, D] in and out is [B, H, T, D] transposed: f32 (the gemm blocks) and bf16
        // (the loops), padded rows and packed sequences, GQA with a window and a cap
        let dev = Device::Cpu;
        let swap = |x: &Tensor| x.transpose(1, 2).unwrap().contiguous().unwrap();
        // (batch, positions, packed lengths, window, cap)
        type Case = (usize, usize, Option<Vec<usize>>, usize, Option<f32>);
        let cases: [Case; 3] = [
            (2, 70, None, 0, None),
            (1, 83, Some(vec![5, 66, 12]), 7, None),
            (2, 40, None, 0, Some(2.0)),
        ];
        for dtype in [DType::F32, DType::BF16] {
            for (b, t, lens, window, softcap) in &cases {
                let p = Params {
                    scale: 0.3,
                    window: *window,
                    softcap: *softcap,
                };
                let lens: Option<Arc<[usize]>> = lens.as_ref().map(|l| l.as_slice().into());
                let var = |h| {
                    let x = Tensor::randn(0f32, 1.0, (*b, h, *t, 16), &dev).unwrap();
                    Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap()
                };
                let (q, k, v) = (var(6), var(2), var(2));
                let up = Tensor::randn(0f32, 1.0, (*b, 6, *t, 16), &dev).unwrap();
                let up = up.to_dtype(dtype).unwrap();
                let heads = tiled_attention_packed(&q, &k, &v, p, lens.clone(), Order::Bhtd);
                let heads = heads.unwrap();
                let (qt, kt, vt) = (
                    Var::from_tensor(&swap(&q)).unwrap(),
                    Var::from_tensor(&swap(&k)).unwrap(),
                    Var::from_tensor(&swap(&v)).unwrap(),
                );
                let tokens = tiled_attention_packed(&qt, &kt, &vt, p, lens, Order::Bthd).unwrap();
                let what = format!("{dtype:?} {b}x{t} window {window} cap {softcap:?}");
                let f32 = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
                assert_eq!(
                    max_abs_diff(&f32(&heads), &f32(&swap(&tokens))),
                    0.0,
                    "{what}"
                );
                let gh = (heads * &up)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let gt = (tokens * swap(&up)).unwrap().sum_all().unwrap();
                let gt = gt.backward().unwrap();
                for (name, a, b) in [("q", &q, &qt), ("k", &k, &kt), ("v", &v, &vt)] {
                    let (a, b) = (gh.get(a).unwrap(), gt.get(b).unwrap());
                    let diff = max_abs_diff(&f32(a), &f32(&swap(b)));
                    assert!(diff < 1e-5, "d{name} {what}: {diff}");
                }
            }
        }
        // a tensor that is not 4-D is named with the order it was not in
        let x = Tensor::zeros((2, 6, 8), DType::F32, &dev).unwrap();
        let p = Params {
            scale: 1.0,
            window: 0,
            softcap: None,
        };
        let e = tiled_attention_packed(&x, &x, &x, p, None, Order::Bthd);
        let e = e.unwrap_err().to_string();
        assert!(e.contains("not Bthd"), "{e}");
    }

    #[test]
    fn fewer_queries_equal_the_whole_sequences_rows_forward_and_gradients() {
        // a shared prompt: sequences of 9, 14 and 6 keys whose last 9, 5 and 1 positions are
        // queries; against every position a query and only those rows' outputs taken
        let dev = Device::Cpu;
        let (lens, queries) = ([9usize, 14, 6], [9usize, 5, 1]);
        let t: usize = lens.iter().sum();
        let at = query_positions(Some(&lens), Some(&queries)).unwrap();
        let rows = Tensor::from_vec(at.iter().map(|&p| p as u32).collect(), at.len(), &dev);
        let rows = rows.unwrap();
        for (dtype, window, softcap) in [
            (DType::F32, 0, None),
            (DType::F32, 4, Some(2.0)),
            (DType::BF16, 0, None),
        ] {
            let p = Params {
                scale: 0.3,
                window,
                softcap,
            };
            let var = |h, t| {
                let x = Tensor::randn(0f32, 1.0, (1, t, h, 16), &dev).unwrap();
                Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap()
            };
            let (q, k, v) = (var(4, t), var(2, t), var(2, t));
            let own = |x: &Tensor| x.index_select(&rows, 1).unwrap();
            let qo = Var::from_tensor(&own(&q)).unwrap();
            let up = Tensor::randn(0f32, 1.0, (1, at.len(), 4, 16), &dev).unwrap();
            let up = up.to_dtype(dtype).unwrap();
            let whole = Some(Arc::from(lens.as_slice()));
            let want = tiled_attention_packed(&q, &k, &v, p, whole, Order::Bthd).unwrap();
            let want = own(&want);
            let packing = (Arc::from(lens.as_slice()), Arc::from(queries.as_slice()));
            let got = tiled_attention_shared(&qo, &k, &v, p, packing, Order::Bthd).unwrap();
            let what = format!("{dtype:?} window {window} cap {softcap:?}");
            let f32 = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
            assert!(max_abs_diff(&f32(&want), &f32(&got)) < 1e-6, "{what}");
            let gw = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let gg = (got * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let dq = max_abs_diff(&f32(&own(gw.get(&q).unwrap())), &f32(gg.get(&qo).unwrap()));
            assert!(dq < 1e-6, "dq {what}: {dq}");
            for (name, x) in [("k", &k), ("v", &v)] {
                let d = max_abs_diff(&f32(gw.get(x).unwrap()), &f32(gg.get(x).unwrap()));
                assert!(d < 1e-5, "d{name} {what}: {d}");
            }
        }
        // more queries than keys, or lengths that are not the rows, are named
        let x = Tensor::zeros((1, 6, 2, 16), DType::F32, &dev).unwrap();
        let p = Params {
            scale: 1.0,
            window: 0,
            softcap: None,
        };
        let bad = (Arc::from(&[2usize, 4][..]), Arc::from(&[3usize, 3][..]));
        let e = tiled_attention_shared(&x, &x, &x, p, bad, Order::Bthd);
        assert!(e.unwrap_err().to_string().contains("not at most"));
        let bad = (Arc::from(&[2usize, 4][..]), Arc::from(&[2usize, 2][..]));
        let e = tiled_attention_shared(&x, &x, &x, p, bad, Order::Bthd);
        assert!(e.unwrap_err().to_string().contains("q [1, .., 6, ..]"));
    }

    #[test]
    fn bf16_stays_within_bf16_rounding() {
        let dev = Device::Cpu;
        let p = Params {
            scale: 0.25,
            window: 0,
            softcap: None,
        };
        let r = |h| Tensor::randn(0f32, 1.0, (1, h, 12, 16), &dev).unwrap();
        let (q, k, v) = (r(4), r(2), r(2));
        let bf = |x: &Tensor| x.to_dtype(DType::BF16).unwrap();
        let f32 = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
        let want = composed(&f32(&bf(&q)), &f32(&bf(&k)), &f32(&bf(&v)), p);
        let got = f32(&tiled_attention(&bf(&q), &bf(&k), &bf(&v), p).unwrap());
        assert!(max_abs_diff(&want, &got) < 1e-2);
    }

    #[test]
    fn mismatched_shapes_are_named() {
        let dev = Device::Cpu;
        let p = Params {
            scale: 1.0,
            window: 0,
            softcap: None,
        };
        let q = Tensor::zeros((1, 3, 4, 8), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 2, 4, 8), DType::F32, &dev).unwrap();
        let e = tiled_attention(&q, &k, &k, p).unwrap_err().to_string();
        assert!(
            e.contains("tiled attention") && e.contains("do not fit"),
            "{e}"
        );
    }
}

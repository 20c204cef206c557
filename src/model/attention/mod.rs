//! Attention: q/k/v projections with the family's query/key norms, RoPE, grouped-query heads,
//! the causal or sliding-window mask and softmax in f32; and the cached form decoding uses.
//!
//! Three ways to the scores: the tiled op (no [T, T] scores in memory; q, k and v kept [B, T,
//! heads, hd] as the projections write them, so nothing is transposed), refdpo's CPU scoring
//! kernels, and stored scores ([`scores`]: candle's ops or refdpo's fused row op, a few
//! sequences at a time).

use super::config::QkNorm;
use super::cpu;
use super::fused::tiled::{tiled_attention_packed, tiled_attention_shared, Order};
use super::fused::{self, Kernel};
use super::gather_rows::gather_rows;
use super::kv_cache::LayerKv;
use super::lora::{Dropout, Proj};
use super::norm::RmsNorm;
use super::packing::Sharing;
use super::rope::rope_at;
use super::tables::SeqContext;
use super::OpMode;
use crate::error::Result;
use crate::profile::{self, Phase};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

mod scores;

pub use scores::attention_chunk;
use scores::repeat_kv;
#[cfg(test)]
pub(super) use scores::QUERY_BLOCK;

#[derive(Debug, Clone)]
pub struct Attention {
    pub(super) q: Proj,
    pub(super) k: Proj,
    pub(super) v: Proj,
    pub(super) o: Proj,
    /// RMSNorm of queries and keys before RoPE (Qwen3 per head, OLMo 2 whole).
    pub(super) qk_norm: Option<(QkNorm, RmsNorm, RmsNorm)>,
    pub(super) num_heads: usize,
    pub(super) num_kv_heads: usize,
    pub(super) head_dim: usize,
    /// The scores' scale (1/√head_dim, or Gemma's `query_pre_attn_scalar`^-½).
    pub(super) scale: f64,
    /// Gemma 2: cap · tanh(scores / cap), after the scale and before the mask.
    pub(super) softcap: Option<f64>,
    /// This layer attends within the sliding window (with the local RoPE base, if any).
    pub(super) sliding: bool,
    /// That window's length (0 for none).
    pub(super) window: usize,
}

/// Hears a layer's keys and values after RoPE, [B, kv, T, hd] each.
pub(super) type KeepKv<'a> = dyn FnMut(&Tensor, &Tensor) -> Result<()> + 'a;

impl Attention {
    /// x [B, T, H] → q [B, nh, T, hd], k and v [B, kv, T, hd], before RoPE, with the query/key
    /// norm where the family has one.
    fn project(
        &self,
        x: &Tensor,
        dropout: Option<&Dropout>,
        mode: OpMode,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (q, k, v) = self.project_tokens(x, dropout, mode)?;
        Ok((heads_first(&q)?, heads_first(&k)?, heads_first(&v)?))
    }

    /// [`Self::project`] with each position's heads together: q [B, T, nh, hd], k and v
    /// [B, T, kv, hd], the projections' outputs reshaped (no copy).
    fn project_tokens(
        &self,
        x: &Tensor,
        dropout: Option<&Dropout>,
        mode: OpMode,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let heads = |lin: &Proj, n: usize, norm: Option<&RmsNorm>| -> Result<Tensor> {
            let mut y = lin.forward(x, dropout)?;
            let kind = self.qk_norm.as_ref().map(|(k, _, _)| *k);
            if let (Some(QkNorm::Whole), Some(norm)) = (kind, norm) {
                y = norm.forward(&y, mode)?;
            }
            let mut y = y.reshape((b, t, n, self.head_dim))?;
            if let (Some(QkNorm::PerHead), Some(norm)) = (kind, norm) {
                y = norm.forward(&y, mode)?;
            }
            Ok(y)
        };
        let (q_norm, k_norm) = match &self.qk_norm {
            Some((_, q, k)) => (Some(q), Some(k)),
            None => (None, None),
        };
        Ok((
            heads(&self.q, self.num_heads, q_norm)?,
            heads(&self.k, self.num_kv_heads, k_norm)?,
            heads(&self.v, self.num_kv_heads, None)?,
        ))
    }

    /// x: [B, T, H] → [B, T, H]
    pub(super) fn forward(&self, x: &Tensor, ctx: &SeqContext, mode: OpMode) -> Result<Tensor> {
        self.forward_keeping(x, ctx, mode, None)
    }

    /// [`Self::forward`], handing the keys and values after RoPE ([B, kv, T, hd]) to `keep`: a
    /// decoding run's prefill fills its cache from them.
    pub(super) fn forward_keeping(
        &self,
        x: &Tensor,
        ctx: &SeqContext,
        mode: OpMode,
        keep: Option<&mut KeepKv>,
    ) -> Result<Tensor> {
        let _phase = profile::scope(Phase::Attention);
        let ((cos, sin), mask) = ctx.for_layer(self.sliding);
        let (b, t, _) = x.dims3()?;
        let (q, k, v) = self.project_tokens(x, ctx.dropout.as_ref(), mode)?;
        if mode.fuses(&q, Kernel::Rope) && self.tiled_for(&q, &k, mode) {
            return self.forward_tokens((q, k, v), (cos, sin), ctx, keep);
        }
        let (q, k, v) = (heads_first(&q)?, heads_first(&k)?, heads_first(&v)?);
        let (q, k) = if mode.fuses(&q, Kernel::Rope) {
            (fused::rope(&q, cos, sin)?, fused::rope(&k, cos, sin)?)
        } else if mode == OpMode::Fast {
            (
                candle_nn::rotary_emb::rope(&q, cos, sin)?,
                candle_nn::rotary_emb::rope(&k, cos, sin)?,
            )
        } else {
            (
                candle_nn::rotary_emb::rope_slow(&q, cos, sin)?,
                candle_nn::rotary_emb::rope_slow(&k, cos, sin)?,
            )
        };
        if let Some(keep) = keep {
            keep(&k, &v)?;
        }
        check_packed(ctx, b, t)?;
        if let (Some(shared), Some(lens)) = (&ctx.shared, &ctx.segments) {
            let out = self.attend_shared(&q, &k, &v, mask, shared, lens, mode)?;
            return self.o.forward(&out, ctx.dropout.as_ref());
        }
        if mode == OpMode::Fast && cpu::attention::covers(&q) {
            let out = cpu::attention::attend(&q, &k, &v, mask, &segments(ctx, b, t), self.spec())?;
            return self.o.forward(&out, ctx.dropout.as_ref());
        }
        let out = match &ctx.segments {
            // a packed row: each sequence attends within itself
            Some(lens) => self.attend_packed(&q, &k, &v, mask, lens, mode)?,
            None => self.attend_all(&q, &k, &v, mask, ctx.attn_seqs, mode)?,
        };
        // [B, nh, T, hd] → [B, T, nh*hd]
        let out = out
            .transpose(1, 2)?
            .reshape((b, t, self.num_heads * self.head_dim))?;
        self.o.forward(&out, ctx.dropout.as_ref())
    }

    /// The tiled op's path, where RoPE is refdpo's too: q [B, T, nh, hd], k and v [B, T, kv, hd]
    /// stay in the order the projections wrote them, through RoPE and the tiled op (their
    /// [`Order::Bthd`]) to the output projection, so no transpose is copied on the way in or
    /// out, in the forward or in the backward.
    fn forward_tokens(
        &self,
        (q, k, v): (Tensor, Tensor, Tensor),
        (cos, sin): (&Tensor, &Tensor),
        ctx: &SeqContext,
        keep: Option<&mut KeepKv>,
    ) -> Result<Tensor> {
        let order = Order::Bthd;
        let (b, t) = (q.dim(0)?, q.dim(1)?);
        let (q, k) = (
            fused::rope_in(order, &q, cos, sin)?,
            fused::rope_in(order, &k, cos, sin)?,
        );
        if let Some(keep) = keep {
            keep(&heads_first(&k)?, &heads_first(&v)?)?;
        }
        check_packed(ctx, b, t)?;
        let p = self.tiled_params();
        let out = match (&ctx.shared, &ctx.segments) {
            // shared first positions: each sequence's keys and values whole, its own rows the
            // queries (none attended twice); in another order of rows, every position a query
            // and each packed row's own output kept (as [`Self::attend_shared`])
            (Some(shared), Some(lens)) => {
                let whole = |x: &Tensor| gather_rows(x, &shared.to_whole, 1);
                let (k, v) = (whole(&k)?, whole(&v)?);
                match &shared.queries {
                    Some(queries) => {
                        let packing = (lens.clone(), queries.clone());
                        tiled_attention_shared(&q, &k, &v, p, packing, order)?
                    }
                    None => {
                        let lens = Some(lens.clone());
                        let out = tiled_attention_packed(&whole(&q)?, &k, &v, p, lens, order)?;
                        gather_rows(&out, &shared.to_own, 1)?
                    }
                }
            }
            (_, lens) => tiled_attention_packed(&q, &k, &v, p, lens.clone(), order)?,
        };
        let out = out.reshape((b, t, self.num_heads * self.head_dim))?;
        self.o.forward(&out, ctx.dropout.as_ref())
    }

    fn tiled_params(&self) -> fused::tiled::Params {
        fused::tiled::Params {
            scale: self.scale as f32,
            window: self.window,
            softcap: self.softcap.map(|c| c as f32),
        }
    }

    fn spec(&self) -> cpu::attention::Spec {
        cpu::attention::Spec {
            scale: self.scale as f32,
            softcap: self.softcap.map(|c| c as f32),
        }
    }

    /// q [1, nh, Σ, hd] and k, v [1, kv, Σ, hd] of a packed row whose sequences share first
    /// positions ([`Sharing`]) → [1, Σ, nh · hd]. The keys and values are gathered into the
    /// whole layout (`lens`, each sequence with all its positions). The CPU's kernel takes each
    /// sequence's own queries against them; the other paths attend over the whole layout
    /// (the shared queries twice: attention alone, not the layers around it) and keep each
    /// packed row's output.
    #[allow(clippy::too_many_arguments)]
    fn attend_shared(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        shared: &Sharing,
        lens: &std::sync::Arc<[usize]>,
        mode: OpMode,
    ) -> Result<Tensor> {
        let whole = |x: &Tensor| gather_rows(x, &shared.to_whole, 2);
        let (k, v) = (whole(k)?, whole(v)?);
        let t = shared.rows();
        if mode == OpMode::Fast && cpu::attention::covers(q) {
            let segments: Vec<_> = shared
                .pieces
                .iter()
                .scan(0, |at, p| {
                    *at += p.whole();
                    Some(cpu::attention::Segment {
                        row: 0,
                        start: p.start,
                        keys: *at - p.whole(),
                        len: p.whole(),
                        offset: p.shared,
                    })
                })
                .collect();
            return cpu::attention::attend(q, &k, &v, mask, &segments, self.spec());
        }
        let out = self.attend_packed(&whole(q)?, &k, &v, mask, lens, mode)?;
        Ok(gather_rows(&out, &shared.to_own, 2)?
            .transpose(1, 2)?
            .reshape((1, t, self.num_heads * self.head_dim))?)
    }

    /// q [1, nh, Σ, hd] against k and v [1, kv, Σ, hd], packed sequences of `lens`, each
    /// attending within itself under its prefix of mask [T, T] → [1, nh, Σ, hd]: the tiled op
    /// over all of them at once where it applies, else one sequence at a time (in parallel on
    /// the CPU: one sequence's small products hardly use a second core).
    fn attend_packed(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        lens: &std::sync::Arc<[usize]>,
        mode: OpMode,
    ) -> Result<Tensor> {
        if self.tiled_for(q, k, mode) {
            // one launch of each kernel over every sequence (the kernels' sequence offsets)
            return Ok(tiled_attention_packed(
                q,
                k,
                v,
                self.tiled_params(),
                Some(lens.clone()),
                Order::Bhtd,
            )?);
        }
        let starts: Vec<usize> = lens
            .iter()
            .scan(0, |at, &len| {
                *at += len;
                Some(*at - len)
            })
            .collect();
        let one = |(&start, &len): (&usize, &usize)| -> Result<Tensor> {
            let part = |x: &Tensor| x.narrow(2, start, len)?.contiguous();
            let prefix = mask.narrow(0, 0, len)?.narrow(1, 0, len)?;
            self.attend_all(&part(q)?, &part(k)?, &part(v)?, &prefix, 1, mode)
        };
        let outs = if q.device().is_cpu() {
            starts
                .par_iter()
                .zip(&lens[..])
                .map(one)
                .collect::<Result<Vec<_>>>()?
        } else {
            starts
                .iter()
                .zip(lens.iter())
                .map(one)
                .collect::<Result<Vec<_>>>()?
        };
        Ok(Tensor::cat(&outs, 2)?)
    }

    /// Whether this attention takes the tiled op: refdpo's fused ops where it covers them, and a
    /// differentiable forward in f32 on the CPU (its blocks with gemm, forward and backward, in
    /// place of the composed attention and its autograd), unless `REFDPO_FUSED` leaves it out.
    fn tiled_for(&self, q: &Tensor, k: &Tensor, mode: OpMode) -> bool {
        match mode {
            _ if fused::leaves_out(Kernel::Tiled) => false,
            OpMode::Fused => self.tiled_covers(q, k),
            _ => self.scores_free(q.device(), q.dtype(), 0, mode),
        }
    }

    /// Whether a forward of `tokens` positions in `dtype` on `device` takes the tiled op, so
    /// that no [T, T] scores exist and its memory grows with the tokens alone (what
    /// [`Self::tiled_for`] decides, from the shapes, without saying why not).
    pub(super) fn scores_free(
        &self,
        device: &Device,
        dtype: DType,
        tokens: usize,
        mode: OpMode,
    ) -> bool {
        match mode {
            _ if fused::leaves_out(Kernel::Tiled) => false,
            OpMode::Fused => {
                let largest = tokens * self.num_heads.max(self.num_kv_heads) * self.head_dim;
                fused::tiled::uncovered(
                    device,
                    dtype,
                    self.head_dim,
                    self.softcap.is_some(),
                    largest,
                )
                .is_none()
            }
            OpMode::Differentiable => OpMode::cpu_loops(device, dtype),
            OpMode::Fast => false,
        }
    }

    /// Whether the tiled op takes q [B, nh, T, hd] against k [B, kv, T, hd]: where it does not
    /// (a dtype, head size or GPU its kernels were not compiled for, a tensor past 2^31
    /// elements), the fused row op or the composed ops run, and stderr and `--profile` say why,
    /// once per reason.
    fn tiled_covers(&self, q: &Tensor, k: &Tensor) -> bool {
        let largest = q.elem_count().max(k.elem_count());
        match fused::tiled::uncovered(
            q.device(),
            q.dtype(),
            self.head_dim,
            self.softcap.is_some(),
            largest,
        ) {
            None => true,
            Some(why) => {
                profile::note_once(format!(
                    "tiled attention not used ({why}): the composed attention runs instead"
                ));
                false
            }
        }
    }

    /// The new positions x [B, t, H] against the cached keys and values (extended here): RoPE
    /// at each row's own positions (cos, sin [B, 1, t, hd/2]), mask [B, 1, t, T] → [B, t, H].
    pub(super) fn forward_cached(
        &self,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        mask: &Tensor,
        kv: &mut Option<LayerKv>,
        capacity: usize,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (q, k, v) = self.project(x, None, OpMode::Fast)?;
        let (q, k) = (rope_at(&q, cos, sin)?, rope_at(&k, cos, sin)?);
        let (k, v) = LayerKv::append(kv, &k, &v, capacity)?;
        if cpu::attention::covers(&q) && mask.rank() == 4 {
            let tk = k.dim(2)?;
            let rows: Vec<_> = (0..b)
                .map(|row| cpu::attention::Segment {
                    offset: tk - t,
                    ..cpu::attention::Segment::whole(row, 0, tk)
                })
                .collect();
            let out = cpu::attention::attend(&q, &k, &v, mask, &rows, self.spec())?;
            return self.o.forward(&out, None);
        }
        let rep = self.num_heads / self.num_kv_heads;
        let out = self.attend(
            &q,
            &repeat_kv(k.contiguous()?, rep)?,
            &repeat_kv(v.contiguous()?, rep)?,
            mask,
            OpMode::Fast,
        )?;
        let out = out
            .transpose(1, 2)?
            .reshape((b, t, self.num_heads * self.head_dim))?;
        self.o.forward(&out, None)
    }
}

/// The sequences of a batch [b, t]: packed ones end to end in its one row, else one per row.
fn segments(ctx: &SeqContext, b: usize, t: usize) -> Vec<cpu::attention::Segment> {
    use cpu::attention::Segment;
    match &ctx.segments {
        Some(lens) => lens
            .iter()
            .scan(0, |at, &len| {
                *at += len;
                Some(Segment::whole(0, *at - len, len))
            })
            .collect(),
        None => (0..b).map(|row| Segment::whole(row, 0, t)).collect(),
    }
}

/// y [B, T, heads, hd] → [B, heads, T, hd], contiguous (a copy).
fn heads_first(y: &Tensor) -> Result<Tensor> {
    Ok(y.transpose(1, 2)?.contiguous()?)
}

/// A packed batch is one row holding all its sequences' positions (each sequence whole, or
/// sharing first positions): [1, t] with t those rows.
fn check_packed(ctx: &SeqContext, b: usize, t: usize) -> Result<()> {
    if let Some(lens) = &ctx.segments {
        let rows = match &ctx.shared {
            Some(shared) => shared.rows(),
            None => lens.iter().sum::<usize>(),
        };
        if b != 1 || rows != t {
            return Err(crate::error::Error::Model(format!(
                "a packed batch is one row of all its sequences: [{b}, {t}] against {rows} rows"
            )));
        }
    }
    Ok(())
}

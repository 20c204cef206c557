//! Attention: q/k/v projections with the family's query/key norms, RoPE, grouped-query heads,
//! the causal or sliding-window mask and softmax in f32 (candle's fused ops, composed ones, or
//! refdpo's fused row op), a few sequences at a time; and the cached form decoding uses.

use super::config::QkNorm;
use super::cpu;
use super::fused::{self, AttnSoftmax, Kernel};
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
use candle_core::{DType, Device, Tensor, D};
use rayon::prelude::*;

/// Queries per block of a scoring forward's causal attention ([`Attention::attend`]).
pub(super) const QUERY_BLOCK: usize = 64;

/// Upper bound on the elements of one chunk of attention scores (sequences × heads × T × T):
/// bounds activation memory and stays far below candle's 32-bit CUDA element count. On the CPU
/// the chunk is kept small (8 MiB of f32): larger fresh buffers are mmapped and page-faulted anew
/// on every chunk (measured in BENCHMARKS.md, "CPU page faults").
fn scores_budget(device: &Device) -> usize {
    if device.is_cpu() {
        1 << 21
    } else {
        1 << 25
    }
}

/// Sequences per attention chunk for `heads` heads over `seq_len` positions on `device` (at
/// least one).
pub fn attention_chunk(heads: usize, seq_len: usize, device: &Device) -> usize {
    (scores_budget(device) / (heads * seq_len * seq_len).max(1)).max(1)
}

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
            Ok(y.transpose(1, 2)?.contiguous()?)
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
        let (q, k, v) = self.project(x, ctx.dropout.as_ref(), mode)?;
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
            return Ok(fused::tiled::tiled_attention_packed(
                q,
                k,
                v,
                self.tiled_params(),
                Some(lens.clone()),
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

    /// q [B, nh, T, hd] against k and v [B, kv, T, hd] under mask [T, T] → [B, nh, T, hd]: the
    /// tiled op where it covers this attention (no [T, T] scores, so no chunks either), else the
    /// scores of `step` sequences at a time.
    fn attend_all(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        step: usize,
        mode: OpMode,
    ) -> Result<Tensor> {
        if self.tiled_for(q, k, mode) {
            return Ok(fused::tiled::tiled_attention(q, k, v, self.tiled_params())?);
        }
        // The fused row op takes each kv head's query heads as rows: no repeated K and V.
        let grouped = self.row_op(mode);
        let (k, v) = if grouped {
            (k.clone(), v.clone())
        } else {
            let rep = self.num_heads / self.num_kv_heads;
            (repeat_kv(k.clone(), rep)?, repeat_kv(v.clone(), rep)?)
        };
        // Scores for all sequences at once would be [B, nh, T, T]: go a few sequences at a time.
        let b = q.dim(0)?;
        let step = step.max(1);
        let mut outs = Vec::with_capacity(b.div_ceil(step));
        for start in (0..b).step_by(step) {
            let len = step.min(b - start);
            outs.push(self.attend_heads(
                &q.narrow(0, start, len)?,
                &k.narrow(0, start, len)?,
                &v.narrow(0, start, len)?,
                mask,
                mode,
                scores_budget(q.device()),
            )?);
        }
        Ok(if outs.len() == 1 {
            outs.pop().expect("one chunk")
        } else {
            Tensor::cat(&outs, 0)?
        })
    }

    /// [`Self::attend`], a few key-value heads (with their query heads), or a few query heads of
    /// one key-value head, at a time where one chunk's scores alone pass `budget` elements: a
    /// long sequence (32 heads × 8192² is 2^31 scores, past the CUDA kernels' 32-bit element
    /// count) in bounded memory. Each head's scores are the same either way.
    fn attend_heads(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        mode: OpMode,
        budget: usize,
    ) -> Result<Tensor> {
        let (b, nh, tq, _) = q.dims4()?;
        let (kv, tk) = (k.dim(1)?, k.dim(2)?);
        let rep = nh / kv.max(1);
        // query heads whose scores fit the budget (at least one)
        let fit = (budget / (b * tq * tk).max(1)).max(1);
        if fit >= nh {
            return self.attend(q, k, v, mask, mode);
        }
        let part = |x: &Tensor, at: usize, n: usize| x.narrow(1, at, n)?.contiguous();
        // (first key-value head, how many, first query head of the first, how many)
        let chunks: Vec<(usize, usize, usize, usize)> = if fit >= rep {
            // whole groups: a few key-value heads with all their query heads
            let heads = fit / rep;
            (0..kv)
                .step_by(heads)
                .map(|h0| {
                    let n = heads.min(kv - h0);
                    (h0, n, h0 * rep, n * rep)
                })
                .collect()
        } else {
            // one key-value head, a few of its query heads at a time (many per group, long rows)
            (0..kv)
                .flat_map(|h| {
                    (0..rep)
                        .step_by(fit)
                        .map(move |j| (h, 1, h * rep + j, fit.min(rep - j)))
                })
                .collect()
        };
        let mut outs = Vec::with_capacity(chunks.len());
        for (h0, n, q0, m) in chunks {
            outs.push(self.attend(
                &part(q, q0, m)?,
                &part(k, h0, n)?,
                &part(v, h0, n)?,
                mask,
                mode,
            )?);
        }
        Ok(Tensor::cat(&outs, 1)?)
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

    /// Whether stored scores take the fused row op (refdpo's fused ops, no soft cap, unless
    /// `REFDPO_FUSED` leaves it out): else the composed scale, mask and softmax.
    fn row_op(&self, mode: OpMode) -> bool {
        mode == OpMode::Fused && self.softcap.is_none() && !fused::leaves_out(Kernel::Softmax)
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

    /// q, k, v: [b, nh, T, hd]; mask [T, T] (or [b, 1, Tq, Tk]) → [b, nh, T, hd]. Softmax in
    /// f32, as HF's eager attention does.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        mode: OpMode,
    ) -> Result<Tensor> {
        if self.row_op(mode) {
            return self.attend_grouped(q, k, v);
        }
        let (tq, tk) = (q.dim(2)?, k.dim(2)?);
        if mode == OpMode::Fast && mask.rank() == 2 && tq == tk && tq > QUERY_BLOCK {
            return self.attend_causal_blocks(q, k, v, mask);
        }
        self.attend_dense(q, k, v, mask, mode)
    }

    /// [`Self::attend`] of a scoring forward, `QUERY_BLOCK` queries at a time, each block
    /// against the keys up to its last row: the masked upper triangle's scores, exponentials
    /// and products are mostly never computed (the same values, as a masked score adds 0).
    fn attend_causal_blocks(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let t = q.dim(2)?;
        let mut outs = Vec::with_capacity(t.div_ceil(QUERY_BLOCK));
        for r0 in (0..t).step_by(QUERY_BLOCK) {
            let rows = QUERY_BLOCK.min(t - r0);
            let keys = r0 + rows;
            outs.push(self.attend_dense(
                &q.narrow(2, r0, rows)?,
                &k.narrow(2, 0, keys)?,
                &v.narrow(2, 0, keys)?,
                &mask.narrow(0, r0, rows)?.narrow(1, 0, keys)?,
                OpMode::Fast,
            )?);
        }
        Ok(Tensor::cat(&outs, 2)?)
    }

    /// [`Self::attend`] with every score of q against k: [b, nh, Tq, Tk].
    fn attend_dense(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        mode: OpMode,
    ) -> Result<Tensor> {
        let mut scores = (q.matmul(&k.t()?)? * self.scale)?;
        if let Some(cap) = self.softcap {
            scores = (super::softcap::tanh_over(&scores, cap)? * cap)?;
        }
        let scores = scores.to_dtype(DType::F32)?.broadcast_add(mask)?;
        let probs = match mode {
            OpMode::Fast => candle_nn::ops::softmax_last_dim(&scores)?,
            _ => candle_nn::ops::softmax(&scores, D::Minus1)?,
        }
        .to_dtype(v.dtype())?;
        Ok(probs.matmul(v)?)
    }

    /// q [b, nh, Tq, hd], k and v [b, kv, Tk, hd] (not repeated) → [b, nh, Tq, hd], with the
    /// fused row op: each kv head's query heads are stacked as rows [b, kv, groups·Tq, Tk].
    fn attend_grouped(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (b, nh, tq, hd) = q.dims4()?;
        let (kv, tk) = (k.dim(1)?, k.dim(2)?);
        let q = q.contiguous()?.reshape((b, kv, nh / kv * tq, hd))?;
        let scores = q.matmul(&k.t()?)?;
        let probs = fused::attention_probs(
            &scores,
            AttnSoftmax {
                scale: self.scale as f32,
                group_rows: tq,
                q_offset: tk - tq,
                window: self.window,
            },
        )?;
        Ok(probs.matmul(v)?.reshape((b, nh, tq, hd))?)
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

fn repeat_kv(x: Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x);
    }
    let (b, n, t, d) = x.dims4()?;
    // [B, n, T, d] → [B, n, rep, T, d] → [B, n*rep, T, d]
    Ok(x.unsqueeze(2)?
        .expand((b, n, rep, t, d))?
        .reshape((b, n * rep, t, d))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::TransformerConfig;
    use crate::model::{init, Transformer};

    /// A sequence whose scores pass the budget goes a few key-value heads at a time, each with
    /// its query heads: the same output as all heads at once, in every op mode.
    #[test]
    fn heads_in_groups_equal_all_heads_at_once() {
        let cfg = TransformerConfig::from_json(
            r#"{"model_type":"qwen2","vocab_size":29,"hidden_size":32,"intermediate_size":24,
            "num_hidden_layers":1,"num_attention_heads":8,"num_key_value_heads":4,
            "rms_norm_eps":1e-6,"rope_theta":10000.0}"#,
        )
        .unwrap();
        let model = Transformer::new(&cfg, &init::init_weights(&cfg, 5, 0.3).unwrap()).unwrap();
        let attn = &model.blocks[0].attn;
        let (t, dev) = (23, Device::Cpu);
        let q = Tensor::randn(0f32, 1., (1, 8, t, 4), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (1, 4, t, 4), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (1, 4, t, 4), &dev).unwrap();
        let mask = crate::model::tables::additive_mask(t, usize::MAX, &dev).unwrap();
        for mode in [OpMode::Fast, OpMode::Differentiable, OpMode::Fused] {
            // the composed ops take repeated key-value heads, the fused row op the grouped ones
            let (k, v) = if attn.row_op(mode) {
                (k.clone(), v.clone())
            } else {
                (
                    repeat_kv(k.clone(), 2).unwrap(),
                    repeat_kv(v.clone(), 2).unwrap(),
                )
            };
            let whole = attn
                .attend_heads(&q, &k, &v, &mask, mode, usize::MAX)
                .unwrap();
            // one query head's scores at a time, three, then three key-value heads' (grouped:
            // a group of two split, then whole groups)
            for budget in [1, 3 * t * t, 3 * 2 * t * t] {
                let parts = attn.attend_heads(&q, &k, &v, &mask, mode, budget).unwrap();
                let diff = crate::test_util::max_abs_diff(&whole, &parts);
                assert!(diff < 1e-6, "{mode:?}, budget {budget}: {diff}");
            }
        }
    }
}

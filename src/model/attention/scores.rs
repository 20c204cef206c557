//! Attention with its scores stored: q · kᵀ for a few sequences, heads or query blocks at a
//! time, the scale, cap, mask and softmax in f32 (candle's ops or refdpo's fused row op), and
//! the product with V. What runs where the tiled op does not ([`super::Attention::tiled_for`]).

use super::Attention;
use crate::error::Result;
use crate::model::fused::{self, AttnSoftmax, Kernel};
use crate::model::OpMode;
use candle_core::{DType, Device, Tensor, D};

/// Queries per block of a scoring forward's causal attention ([`Attention::attend`]).
pub(in crate::model) const QUERY_BLOCK: usize = 64;

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

impl Attention {
    /// q [B, nh, T, hd] against k and v [B, kv, T, hd] under mask [T, T] → [B, nh, T, hd]: the
    /// tiled op where it covers this attention (no [T, T] scores, so no chunks either), else the
    /// scores of `step` sequences at a time.
    pub(super) fn attend_all(
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

    /// Whether stored scores take the fused row op (refdpo's fused ops, no soft cap, unless
    /// `REFDPO_FUSED` leaves it out): else the composed scale, mask and softmax.
    fn row_op(&self, mode: OpMode) -> bool {
        mode == OpMode::Fused && self.softcap.is_none() && !fused::leaves_out(Kernel::Softmax)
    }

    /// q, k, v: [b, nh, T, hd]; mask [T, T] (or [b, 1, Tq, Tk]) → [b, nh, T, hd]. Softmax in
    /// f32, as HF's eager attention does.
    pub(super) fn attend(
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
            scores = (crate::model::softcap::tanh_over(&scores, cap)? * cap)?;
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

pub(super) fn repeat_kv(x: Tensor, rep: usize) -> Result<Tensor> {
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

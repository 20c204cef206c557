//! Completion log-probs, shared by both stages: gather the hidden states that predict completion
//! tokens, then project onto the vocabulary a chunk of rows at a time, so a batch's full-vocabulary
//! logits ([B, T, V], which overflows candle's 32-bit CUDA indexing at real sizes) never exist.
//! The backward is chunked the same way: d logp / d logits = onehot(target) − softmax(logits).

use crate::config::Truncation;
use crate::error::{Error, Result};
use crate::model::{OpMode, Transformer};
use crate::tokenize::window;
use candle_core::{DType, Device, Tensor, D};

/// Upper bound on the elements of one chunk of logits (rows × vocabulary).
const LOGITS_BUDGET: usize = 1 << 26;

/// A right-padded batch of `prompt ++ completion` sequences and where their completions are.
#[derive(Debug)]
pub struct SeqBatch {
    /// [B, T] u32
    pub input_ids: Tensor,
    /// [N] u32: flat index (b·T + t) of the position predicting each completion token.
    pub gather_idx: Tensor,
    /// [N] u32: the completion tokens.
    pub targets: Tensor,
    /// Completion tokens per sequence (sums to N).
    pub counts: Vec<usize>,
    pub seq_len: usize,
}

impl SeqBatch {
    /// `seqs`: (prompt, completion) per sequence. Each prompt must be non-empty.
    pub fn new(seqs: &[(&[u32], &[u32])], pad_id: u32, device: &Device) -> Result<Self> {
        let t = seqs
            .iter()
            .map(|(p, c)| p.len() + c.len())
            .max()
            .unwrap_or(0);
        let mut ids = Vec::with_capacity(seqs.len() * t);
        let (mut gather, mut targets, mut counts) = (Vec::new(), Vec::new(), Vec::new());
        for (b, (prompt, completion)) in seqs.iter().enumerate() {
            if prompt.is_empty() {
                return Err(Error::Model(
                    "a sequence has an empty prompt: no position predicts its first token".into(),
                ));
            }
            ids.extend_from_slice(prompt);
            ids.extend_from_slice(completion);
            ids.resize((b + 1) * t, pad_id);
            for (k, &tok) in completion.iter().enumerate() {
                gather.push((b * t + prompt.len() + k - 1) as u32);
                targets.push(tok);
            }
            counts.push(completion.len());
        }
        let n = targets.len();
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (seqs.len(), t), device)?,
            gather_idx: Tensor::from_vec(gather, n, device)?,
            targets: Tensor::from_vec(targets, n, device)?,
            counts,
            seq_len: t,
        })
    }

    /// hidden [B, T, H] → the rows that predict completion tokens [N, H].
    pub fn gather_rows(&self, hidden: &Tensor) -> Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        Ok(hidden
            .reshape((b * t, h))?
            .index_select(&self.gather_idx, 0)?)
    }

    /// Sums token log-probs [N] per sequence, in f64 on the host.
    pub fn sequence_sums(&self, token_logps: &Tensor) -> Result<Vec<f64>> {
        let v = token_logps.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let mut out = Vec::with_capacity(self.counts.len());
        let mut at = 0;
        for &c in &self.counts {
            out.push(v[at..at + c].iter().map(|&x| f64::from(x)).sum());
            at += c;
        }
        Ok(out)
    }
}

/// One pair's tokens: prompt, chosen completion, rejected completion (as the cache stores them).
pub type PairIds<'a> = (&'a [u32], &'a [u32], &'a [u32]);

impl SeqBatch {
    /// The 2B sequences of B pairs — chosen first, then rejected — each cut by [`window`].
    pub fn pairs(
        pairs: &[PairIds<'_>],
        max_length: usize,
        mode: Truncation,
        pad_id: u32,
        device: &Device,
    ) -> Result<Self> {
        let seqs: Vec<_> = pairs
            .iter()
            .map(|(p, c, _)| window(p, c, max_length, mode))
            .chain(pairs.iter().map(|(p, _, r)| window(p, r, max_length, mode)))
            .collect();
        Self::new(&seqs, pad_id, device)
    }
}

/// Summed completion log-probs of each sequence under a frozen model (no graph is built).
pub fn score(model: &Transformer, batch: &SeqBatch, mode: OpMode) -> Result<Vec<f64>> {
    let hidden = model.forward_hidden(&batch.input_ids, mode)?; // [B, T, H]
    let rows = batch.gather_rows(&hidden)?; // [N, H]
    let lp = token_logps(&rows, &model.lm_head, &batch.targets)?; // [N]
    batch.sequence_sums(&lp)
}

/// Scores B pairs in one batched forward: (chosen, rejected) summed log-probs per pair.
pub fn score_pairs(
    model: &Transformer,
    pairs: &[PairIds<'_>],
    max_length: usize,
    mode: Truncation,
    device: &Device,
) -> Result<Vec<(f64, f64)>> {
    let batch = SeqBatch::pairs(pairs, max_length, mode, 0, device)?;
    let sums = score(model, &batch, OpMode::Fast)?;
    let b = pairs.len();
    Ok((0..b).map(|i| (sums[i], sums[b + i])).collect())
}

fn chunk_rows(vocab: usize) -> usize {
    (LOGITS_BUDGET / vocab.max(1)).max(1)
}

/// rows [N, H] · lm_head [V, H]ᵀ → log p(target) [N] in f32, one chunk of rows at a time.
/// Differentiable when the inputs are tracked, but then each chunk's graph is kept: training uses
/// [`token_logps_backward`] on detached inputs instead.
pub fn token_logps(rows: &Tensor, lm_head: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, _) = rows.dims2()?;
    let step = chunk_rows(lm_head.dim(0)?);
    let mut parts = Vec::with_capacity(n.div_ceil(step));
    for start in (0..n).step_by(step) {
        let len = step.min(n - start);
        // [len, V] logits in f32; log p(target) = logit[target] − max − log Σ exp(logit − max),
        // without writing a second [len, V] tensor for the log-softmax.
        let logits = rows
            .narrow(0, start, len)?
            .matmul(&lm_head.t()?)?
            .to_dtype(DType::F32)?;
        let tgt = targets.narrow(0, start, len)?;
        let max = logits.max_keepdim(D::Minus1)?; // [len, 1]
        let lse = logits
            .broadcast_sub(&max)?
            .exp()?
            .sum_keepdim(D::Minus1)?
            .log()?; // [len, 1]
        let picked = logits.gather(&tgt.unsqueeze(1)?, 1)?; // [len, 1]
        parts.push(((picked - max)? - lse)?.squeeze(1)?);
    }
    if parts.is_empty() {
        return Ok(Tensor::zeros(0, DType::F32, rows.device())?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Backward of [`token_logps`] for upstream gradient `g` [N] (f32): returns
/// (d/d rows [N, H], d/d lm_head [V, H]) in the dtype of `rows`, recomputing each chunk's logits.
pub fn token_logps_backward(
    rows: &Tensor,
    lm_head: &Tensor,
    targets: &Tensor,
    g: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (n, _) = rows.dims2()?;
    let dtype = rows.dtype();
    let step = chunk_rows(lm_head.dim(0)?);
    let mut grad_rows = Vec::with_capacity(n.div_ceil(step));
    let mut grad_w = lm_head.zeros_like()?.to_dtype(DType::F32)?;
    for start in (0..n).step_by(step) {
        let len = step.min(n - start);
        let h = rows.narrow(0, start, len)?;
        let logits = h.matmul(&lm_head.t()?)?.to_dtype(DType::F32)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?;
        let g_chunk = g.narrow(0, start, len)?.unsqueeze(1)?; // [len, 1]
        let tgt = targets.narrow(0, start, len)?.unsqueeze(1)?;
        // d logp/d logits · g = g·onehot − g·p   [len, V]
        let onehot_g = probs.zeros_like()?.scatter_add(&tgt, &g_chunk, 1)?;
        let grad_logits = (onehot_g - probs.broadcast_mul(&g_chunk)?)?.to_dtype(dtype)?;
        grad_rows.push(grad_logits.matmul(lm_head)?); // [len, H]
        grad_w = (grad_w + grad_logits.t()?.matmul(&h)?.to_dtype(DType::F32)?)?;
        // [V, H]
    }
    let grad_rows = if grad_rows.is_empty() {
        rows.zeros_like()?
    } else {
        Tensor::cat(&grad_rows, 0)?
    };
    Ok((grad_rows, grad_w.to_dtype(dtype)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn chunked_backward_matches_autograd() {
        let dev = Device::Cpu;
        let rows = Var::from_tensor(&Tensor::randn(0f32, 1.0, (7, 5), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (11, 5), &dev).unwrap()).unwrap();
        let targets = Tensor::new(&[0u32, 3, 10, 2, 2, 7, 1], &dev).unwrap();
        let g = Tensor::new(&[0.5f32, -1.0, 2.0, 0.0, 1.5, -0.25, 3.0], &dev).unwrap();
        let lp = token_logps(rows.as_tensor(), w.as_tensor(), &targets).unwrap();
        let grads = (lp * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let (gr, gw) = token_logps_backward(rows.as_tensor(), w.as_tensor(), &targets, &g).unwrap();
        let diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(diff(grads.get(rows.as_tensor()).unwrap(), &gr) < 1e-5);
        assert!(diff(grads.get(w.as_tensor()).unwrap(), &gw) < 1e-5);
    }

    #[test]
    fn batch_layout_and_sums() {
        let dev = Device::Cpu;
        let b = SeqBatch::new(&[(&[1, 2], &[3, 4, 5]), (&[6], &[7])], 0, &dev).unwrap();
        assert_eq!(b.seq_len, 5);
        assert_eq!(
            b.input_ids.to_vec2::<u32>().unwrap(),
            vec![vec![1, 2, 3, 4, 5], vec![6, 7, 0, 0, 0]]
        );
        assert_eq!(b.gather_idx.to_vec1::<u32>().unwrap(), vec![1, 2, 3, 5]);
        assert_eq!(b.targets.to_vec1::<u32>().unwrap(), vec![3, 4, 5, 7]);
        let sums = b
            .sequence_sums(&Tensor::new(&[-1f32, -2.0, -3.0, -0.5], &dev).unwrap())
            .unwrap();
        assert_eq!(sums, vec![-6.0, -0.5]);
    }
}

//! Completion log-probs, shared by both stages: gather the hidden states that predict completion
//! tokens, then project onto the vocabulary a chunk of rows at a time, so a batch's full-vocabulary
//! logits ([B, T, V], which overflows candle's 32-bit CUDA indexing at real sizes) never exist.
//! The backward is chunked the same way: d logp / d logits = onehot(target) − softmax(logits).

use crate::config::Truncation;
use crate::error::{Error, Result};
use crate::model::{cpu, fused, softcap, OpMode, SeqContext, Transformer};
use crate::profile::{self, Phase};
use crate::tokenize::window;
use candle_core::{DType, Device, Tensor, D};
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether this process's allocator keeps freed buffers for reuse. Set by the commands that
/// compute on the CPU, right after the allocator was told to (`run::compute_device`), never unset:
/// the large CPU chunks below rely on freed chunks coming back from the heap, not from mmap.
static HEAP_KEPT: AtomicBool = AtomicBool::new(false);

/// Records that the allocator keeps freed buffers: CPU chunks of logits may then be large.
pub fn heap_kept() {
    HEAP_KEPT.store(true, Ordering::Relaxed);
}

/// Upper bound on the elements of one chunk of logits (rows × vocabulary): 256 MiB of f32 on an
/// accelerator. On the CPU, 128 MiB where the allocator keeps freed buffers for the next chunk,
/// else 16 MiB: larger fresh buffers are mmapped and page-faulted in anew on every chunk
/// (BENCHMARKS.md, "CPU page faults").
fn logits_budget(device: &Device) -> usize {
    match (device.is_cpu(), HEAP_KEPT.load(Ordering::Relaxed)) {
        (false, _) => 1 << 26,
        (true, true) => 1 << 25,
        (true, false) => 1 << 22,
    }
}

/// A batch of `prompt ++ completion` sequences and where their completions are: right-padded
/// to [B, T], or packed end to end into one row [1, Σ len] with no padding (`segments`).
#[derive(Debug)]
pub struct SeqBatch {
    /// [B, T] u32, or [1, Σ len] when packed
    pub input_ids: Tensor,
    /// The same ids on the host (the embedding's backward sorts them there).
    pub host_ids: Vec<u32>,
    /// [N] u32: flat index (b·T + t, or the packed offset) of the position predicting each
    /// completion token.
    pub gather_idx: Tensor,
    /// [N] u32: the completion tokens.
    pub targets: Tensor,
    /// Completion tokens per sequence (sums to N).
    pub counts: Vec<usize>,
    /// The longest sequence.
    pub seq_len: usize,
    /// Packed: each sequence's length, in row order.
    pub segments: Option<Vec<usize>>,
}

impl SeqBatch {
    /// `seqs`: (prompt, completion) per sequence, right-padded with `pad_id`. Each prompt must
    /// be non-empty.
    pub fn new(seqs: &[(&[u32], &[u32])], pad_id: u32, device: &Device) -> Result<Self> {
        let t = seqs
            .iter()
            .map(|(p, c)| p.len() + c.len())
            .max()
            .unwrap_or(0);
        Self::laid_out(seqs, Some((pad_id, t)), device)
    }

    /// `seqs` packed end to end into one row: no position is padding, and each sequence
    /// attends within itself ([`SeqContext::packed`]).
    pub fn packed(seqs: &[(&[u32], &[u32])], device: &Device) -> Result<Self> {
        Self::laid_out(seqs, None, device)
    }

    /// Padded to `pad` = (id, length), or packed.
    fn laid_out(
        seqs: &[(&[u32], &[u32])],
        pad: Option<(u32, usize)>,
        device: &Device,
    ) -> Result<Self> {
        let mut ids = Vec::new();
        let (mut gather, mut targets, mut counts, mut lens) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (prompt, completion) in seqs {
            if prompt.is_empty() {
                return Err(Error::Model(
                    "a sequence has an empty prompt: no position predicts its first token".into(),
                ));
            }
            let start = ids.len();
            ids.extend_from_slice(prompt);
            ids.extend_from_slice(completion);
            if let Some((pad_id, t)) = pad {
                ids.resize(start + t, pad_id);
            }
            for (k, &tok) in completion.iter().enumerate() {
                gather.push((start + prompt.len() + k - 1) as u32);
                targets.push(tok);
            }
            counts.push(completion.len());
            lens.push(prompt.len() + completion.len());
        }
        let n = targets.len();
        let seq_len = lens.iter().copied().max().unwrap_or(0);
        let (shape, segments) = match pad {
            Some((_, t)) => ((seqs.len(), t), None),
            None => ((1, ids.len()), Some(lens)),
        };
        Ok(Self {
            input_ids: Tensor::from_slice(&ids, shape, device)?,
            host_ids: ids,
            gather_idx: Tensor::from_vec(gather, n, device)?,
            targets: Tensor::from_vec(targets, n, device)?,
            counts,
            seq_len,
            segments,
        })
    }

    /// The context of this batch's forward from `full`, the tables of [`Self::seq_len`]
    /// positions: packed along the row where the batch is.
    pub fn context(&self, full: SeqContext) -> Result<SeqContext> {
        match &self.segments {
            Some(lens) => full.packed(lens),
            None => Ok(full),
        }
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
    /// The 2B sequences of B pairs — chosen first, then rejected — each cut by [`window`]:
    /// right-padded with `pad_id`, or packed when it is `None`.
    pub fn pairs(
        pairs: &[PairIds<'_>],
        max_length: usize,
        mode: Truncation,
        pad_id: Option<u32>,
        device: &Device,
    ) -> Result<Self> {
        let seqs: Vec<_> = pairs
            .iter()
            .map(|(p, c, _)| window(p, c, max_length, mode))
            .chain(pairs.iter().map(|(p, _, r)| window(p, r, max_length, mode)))
            .collect();
        match pad_id {
            Some(pad_id) => Self::new(&seqs, pad_id, device),
            None => Self::packed(&seqs, device),
        }
    }
}

/// Summed completion log-probs of each sequence under a frozen model (no graph is built).
pub fn score(model: &Transformer, batch: &SeqBatch, mode: OpMode) -> Result<Vec<f64>> {
    let device = batch.input_ids.device();
    let ctx = batch.context(model.context(batch.seq_len, device)?)?;
    let hidden = model.forward_hidden_in(&ctx, &batch.input_ids, mode)?; // [B, T, H] or [1, Σ, H]
    let rows = batch.gather_rows(&hidden)?; // [N, H]
    let lp = token_logps(
        &rows,
        &model.lm_head,
        &batch.targets,
        model.cfg.final_softcap,
        mode,
    )?; // [N]
    batch.sequence_sums(&lp)
}

/// Scores B pairs in one packed forward (no padding): (chosen, rejected) summed log-probs per
/// pair.
pub fn score_pairs(
    model: &Transformer,
    pairs: &[PairIds<'_>],
    max_length: usize,
    mode: Truncation,
    device: &Device,
) -> Result<Vec<(f64, f64)>> {
    let batch = SeqBatch::pairs(pairs, max_length, mode, None, device)?;
    let sums = score(model, &batch, OpMode::scoring(device))?;
    let b = pairs.len();
    Ok((0..b).map(|i| (sums[i], sums[b + i])).collect())
}

fn chunk_rows(vocab: usize, device: &Device) -> usize {
    (logits_budget(device) / vocab.max(1)).max(1)
}

/// rows [N, H] · lm_head [V, H]ᵀ → log p(target) [N] in f32, one chunk of rows at a time.
/// Differentiable when the inputs are tracked, but then each chunk's graph is kept: training uses
/// [`token_logps_backward`] on detached inputs instead.
pub fn token_logps(
    rows: &Tensor,
    lm_head: &Tensor,
    targets: &Tensor,
    cap: Option<f64>,
    mode: OpMode,
) -> Result<Tensor> {
    Ok(token_logps_lse(rows, lm_head, targets, cap, mode)?.0)
}

/// Whether the fused log-prob kernels apply (not through Gemma 2's final soft cap, nor where
/// `REFDPO_FUSED` leaves them out).
fn fused_logps(mode: OpMode, cap: Option<f64>) -> bool {
    mode == OpMode::Fused && cap.is_none() && !fused::leaves_out(fused::Kernel::Logprobs)
}

/// [`token_logps`] and each row's log-sum-exp over the vocabulary ([N] f32 each): the backward
/// needs the latter to normalize one vocabulary chunk at a time. The fused kernel reads each
/// chunk of logits once in its own dtype; the composed version copies it to f32 first.
pub fn token_logps_lse(
    rows: &Tensor,
    lm_head: &Tensor,
    targets: &Tensor,
    cap: Option<f64>,
    mode: OpMode,
) -> Result<(Tensor, Tensor)> {
    let _phase = profile::scope(Phase::Logprobs);
    let (n, _) = rows.dims2()?;
    let step = chunk_rows(lm_head.dim(0)?, rows.device());
    let (mut logps, mut lses) = (Vec::new(), Vec::new());
    for start in (0..n).step_by(step) {
        let len = step.min(n - start);
        let tgt = targets.narrow(0, start, len)?;
        if fused_logps(mode, cap) {
            let logits = rows.narrow(0, start, len)?.matmul(&lm_head.t()?)?;
            let (lp, lse) = fused::logp_lse(&logits, &tgt)?;
            logps.push(lp);
            lses.push(lse);
            continue;
        }
        let logits = rows.narrow(0, start, len)?.matmul(&lm_head.t()?)?;
        if cap.is_none() && cpu::logits::covers(&logits) {
            // one pass per row on the CPU, in SIMD lanes (no graph: training's forward of the
            // log-probs too, whose backward is [`token_logps_backward`])
            let (lp, lse) = cpu::logits::logp_lse(&logits, &tgt)?;
            logps.push(lp);
            lses.push(lse);
            continue;
        }
        // [len, V] logits in f32; log p(target) = logit[target] − lse, lse = max + log Σ
        // exp(logit − max), without writing a second [len, V] tensor for the log-softmax.
        let logits = logits.to_dtype(DType::F32)?;
        let logits = softcap(logits, cap)?;
        let max = logits.max_keepdim(D::Minus1)?; // [len, 1]
        let lse = (logits
            .broadcast_sub(&max)?
            .exp()?
            .sum_keepdim(D::Minus1)?
            .log()?
            + &max)?; // [len, 1]
        let picked = logits.gather(&tgt.unsqueeze(1)?, 1)?; // [len, 1]
        logps.push((picked - &lse)?.squeeze(1)?);
        lses.push(lse.squeeze(1)?);
    }
    if logps.is_empty() {
        let empty = Tensor::zeros(0, DType::F32, rows.device())?;
        return Ok((empty.clone(), empty));
    }
    Ok((Tensor::cat(&logps, 0)?, Tensor::cat(&lses, 0)?))
}

/// Where the `lm_head` gradient goes, one vocabulary chunk at a time: `(v0, d/d lm_head[v0..])`
/// with the chunk's rows [len, H] complete (summed over every row of the batch).
pub type HeadGradSink<'a> = &'a mut dyn FnMut(usize, &Tensor) -> Result<()>;

/// Backward of [`token_logps`] for upstream gradient `g` [N] (f32), given each row's
/// log-sum-exp `lse` [N] from [`token_logps_lse`]: returns d/d rows [N, H] in the dtype of
/// `rows`, and hands d/d lm_head to `head_grad` chunk by chunk (`None`: a frozen head needs
/// none).
///
/// d logp/d logits · g = g·onehot(target) − g·softmax(logits). It goes one vocabulary chunk at
/// a time, so only [N, chunk] logits exist at once, and the head's gradient never exists
/// whole here: the sink stores each chunk where it keeps the sum (the trainer: in place, in
/// its state dtype).
///
/// With a soft cap, the chain rule goes on through cap · tanh(z / cap): d/dz = 1 − tanh².
#[allow(clippy::too_many_arguments)] // the inputs of the forward, its lse, g, and the sink
pub fn token_logps_backward(
    rows: &Tensor,
    lm_head: &Tensor,
    targets: &Tensor,
    g: &Tensor,
    lse: &Tensor,
    cap: Option<f64>,
    head_grad: Option<HeadGradSink<'_>>,
    mode: OpMode,
) -> Result<Tensor> {
    let _phase = profile::scope(Phase::Logprobs);
    let step = (logits_budget(rows.device()) / rows.dim(0)?.max(1)).max(1);
    let chunks = VocabChunks {
        step,
        fused: fused_logps(mode, cap),
    };
    backward_by_vocab_chunks(rows, lm_head, targets, g, lse, cap, chunks, head_grad)
}

/// How [`backward_by_vocab_chunks`] goes: vocabulary entries per chunk, and whether each
/// chunk's gradient is the fused kernel's.
#[derive(Debug, Clone, Copy)]
struct VocabChunks {
    step: usize,
    fused: bool,
}

/// [`token_logps_backward`] as `chunks` says (tests set the chunk size).
#[allow(clippy::too_many_arguments)] // token_logps_backward's, with the chunking spelled out
fn backward_by_vocab_chunks(
    rows: &Tensor,
    lm_head: &Tensor,
    targets: &Tensor,
    g: &Tensor,
    lse: &Tensor,
    cap: Option<f64>,
    chunks: VocabChunks,
    mut head_grad: Option<HeadGradSink<'_>>,
) -> Result<Tensor> {
    let VocabChunks {
        step,
        fused: fused_chunks,
    } = chunks;
    let (n, h) = rows.dims2()?;
    let vocab = lm_head.dim(0)?;
    let dtype = rows.dtype();
    let dev = rows.device();
    if n == 0 {
        // no row: the head's gradient is zero
        if let Some(sink) = head_grad.as_mut() {
            sink(0, &Tensor::zeros((vocab, h), DType::F32, dev)?)?;
        }
        return Ok(rows.zeros_like()?);
    }
    let step = step.clamp(1, vocab);
    // the fused kernel's per-row inputs, packed once for every chunk
    let lse_g = fused_chunks
        .then(|| fused::lse_and_grad(lse, g))
        .transpose()?;
    let g_col = g.to_dtype(DType::F32)?.unsqueeze(1)?; // [N, 1]
                                                       // targets as f32 (exact below 2^24 ids), for the in-chunk test on the device: no host copy
    let tgt = targets.to_dtype(DType::F32)?.unsqueeze(1)?; // [N, 1]
    let lse = lse.unsqueeze(1)?; // [N, 1]
    let mut grad_rows = Tensor::zeros((n, h), DType::F32, dev)?;
    for v0 in (0..vocab).step_by(step) {
        let len = step.min(vocab - v0);
        let w = lm_head.narrow(0, v0, len)?; // [len, H]
                                             // d/dz [N, len] in the compute dtype
        let grad_logits = match &lse_g {
            Some(lse_g) => fused::logp_grad(&rows.matmul(&w.t()?)?, targets, lse_g, v0)?,
            None => {
                let z = rows.matmul(&w.t()?)?.to_dtype(DType::F32)?; // [N, len]
                let (logits, tanh) = match cap {
                    Some(c) => {
                        let t = (&z / c)?.tanh()?;
                        ((&t * c)?, Some(t))
                    }
                    None => (z, None),
                };
                let probs = logits.broadcast_sub(&lse)?.exp()?;
                // g at each row's target column when the target falls in this chunk (else 0
                // at column 0), computed on the device
                let local = (&tgt - v0 as f64)?; // [N, 1]
                let inside = local
                    .ge(0.0)?
                    .mul(&local.lt(len as f64)?)?
                    .to_dtype(DType::F32)?;
                let idx = local.clamp(0f32, (len - 1) as f32)?.to_dtype(DType::U32)?;
                let val = (&g_col * inside)?;
                let onehot_g = probs.zeros_like()?.scatter_add(&idx, &val, 1)?;
                let grad_logits = (onehot_g - probs.broadcast_mul(&g_col)?)?;
                // through the soft cap, then in the compute dtype
                match tanh {
                    Some(t) => (grad_logits * (1.0 - t.sqr()?)?)?,
                    None => grad_logits,
                }
                .to_dtype(dtype)?
            }
        };
        if let Some(sink) = head_grad.as_mut() {
            sink(v0, &grad_logits.t()?.matmul(rows)?)?; // [len, H]
        }
        grad_rows = (grad_rows + grad_logits.matmul(&w)?.to_dtype(DType::F32)?)?;
    }
    Ok(grad_rows.to_dtype(dtype)?)
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
        let diff = crate::test_util::max_abs_diff;
        // without and with Gemma 2's final soft cap (small, so it bends the logits)
        for cap in [None, Some(1.5)] {
            let lp =
                token_logps(rows.as_tensor(), w.as_tensor(), &targets, cap, OpMode::Fast).unwrap();
            let grads = (&lp * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let (_, lse) =
                token_logps_lse(rows.as_tensor(), w.as_tensor(), &targets, cap, OpMode::Fast)
                    .unwrap();
            // one vocabulary chunk, then chunks of 3 (the last one short: 11 = 3 + 3 + 3 + 2),
            // composed and fused (no fused kernel through the soft cap)
            for (step, fused) in [
                (usize::MAX, false),
                (3, false),
                (usize::MAX, true),
                (3, true),
            ] {
                if fused && cap.is_some() {
                    continue;
                }
                if fused {
                    let (lp_f, lse_f) = token_logps_lse(
                        rows.as_tensor(),
                        w.as_tensor(),
                        &targets,
                        cap,
                        OpMode::Fused,
                    )
                    .unwrap();
                    assert!(diff(&lp_f, &lp) < 1e-5);
                    assert!(diff(&lse_f, &lse) < 1e-5);
                }
                let chunks = VocabChunks { step, fused };
                // the head's gradient as the sink receives it, chunk by chunk
                let gw = Tensor::zeros((11, 5), DType::F32, &dev).unwrap();
                let mut seen = 0;
                let mut sink = |v0: usize, chunk: &Tensor| -> Result<()> {
                    assert_eq!(v0, seen, "chunks in order, each once");
                    seen += chunk.dim(0)?;
                    Ok(gw.slice_set(&chunk.to_dtype(DType::F32)?, 0, v0)?)
                };
                let gr = backward_by_vocab_chunks(
                    rows.as_tensor(),
                    w.as_tensor(),
                    &targets,
                    &g,
                    &lse,
                    cap,
                    chunks,
                    Some(&mut sink),
                )
                .unwrap();
                assert_eq!(seen, 11);
                assert!(
                    diff(grads.get(rows.as_tensor()).unwrap(), &gr) < 1e-5,
                    "{cap:?}"
                );
                assert!(
                    diff(grads.get(w.as_tensor()).unwrap(), &gw) < 1e-5,
                    "{cap:?}"
                );
            }
        }
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

    /// Packed rows score as padded ones, within 1e-6 in f32, in every family (sliding windows
    /// shorter than the longest sequence, Gemma 2's soft caps, Gemma 3's local RoPE, query/key
    /// norms) and through each op set.
    #[test]
    fn packed_rows_score_as_padded_ones() {
        let families = [
            ("llama", ""),
            ("qwen2", r#","tie_word_embeddings":true"#),
            ("mistral", r#","sliding_window":6"#),
            ("qwen3", r#","head_dim":8"#),
            ("olmo2", ""),
            ("phi3", r#","sliding_window":6"#),
            (
                "gemma2",
                r#","sliding_window":6,"query_pre_attn_scalar":8,"attn_logit_softcapping":5.0,
                "final_logit_softcapping":3.0,"hidden_activation":"gelu_pytorch_tanh""#,
            ),
            (
                "gemma3_text",
                r#","sliding_window":6,"query_pre_attn_scalar":8,"rope_local_base_freq":1000.0,
                "layer_types":["sliding_attention","full_attention"],
                "hidden_activation":"gelu_pytorch_tanh""#,
            ),
        ];
        let ids = |n: u32, seed: u32| -> Vec<u32> { (0..n).map(|i| (i * 7 + seed) % 61).collect() };
        let (p1, c1, r1) = (ids(5, 1), ids(9, 2), ids(4, 3));
        let (p2, c2, r2) = (ids(3, 4), ids(2, 5), ids(11, 6));
        let (p3, c3, r3) = (ids(7, 7), ids(1, 8), ids(6, 9));
        let pairs = [
            (&p1[..], &c1[..], &r1[..]),
            (&p2, &c2, &r2),
            (&p3, &c3, &r3),
        ];
        let dev = Device::Cpu;
        for (arch, extra) in families {
            let cfg = crate::model::TransformerConfig::from_json(&format!(
                r#"{{"model_type":"{arch}","vocab_size":61,"hidden_size":16,"intermediate_size":24,
                "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
                "rms_norm_eps":1e-6,"rope_theta":10000.0{extra}}}"#
            ))
            .unwrap();
            let w = crate::model::init::init_weights(&cfg, 5, 0.2).unwrap();
            let model = Transformer::new(&cfg, &w).unwrap();
            let padded = SeqBatch::pairs(&pairs, 64, Truncation::KeepStart, Some(0), &dev).unwrap();
            let packed = SeqBatch::pairs(&pairs, 64, Truncation::KeepStart, None, &dev).unwrap();
            assert_eq!(
                packed.input_ids.dims(),
                [1, 5 + 9 + 3 + 2 + 7 + 1 + 5 + 4 + 3 + 11 + 7 + 6]
            );
            for mode in [OpMode::Fast, OpMode::Differentiable, OpMode::Fused] {
                let want = score(&model, &padded, mode).unwrap();
                let got = score(&model, &packed, mode).unwrap();
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                        "{arch} {mode:?}: {got:?} vs {want:?}"
                    );
                }
            }
        }
    }
}

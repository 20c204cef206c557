//! Completion log-probs, shared by both stages: gather the hidden states that predict completion
//! tokens, then project onto the vocabulary a chunk of rows at a time, so a batch's full-vocabulary
//! logits ([B, T, V], which overflows candle's 32-bit CUDA indexing at real sizes) never exist.
//! The backward is chunked the same way: d logp / d logits = onehot(target) − softmax(logits).

use crate::config::Truncation;
use crate::error::Result;
use crate::model::{cpu, fused, softcap, OpMode, Transformer};
use crate::profile::{self, Phase};
use candle_core::{DType, Device, Tensor, D};
use std::sync::atomic::{AtomicBool, Ordering};

mod batch;
pub use batch::{PairIds, SeqBatch};

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

/// Whether stage one's scoring shares each pair's prompt rows ([`SeqBatch::pairs_shared`]):
/// yes unless `REFDPO_SHARE_PROMPTS=0`, which scores every sequence whole (to compare).
pub fn shares_prompts() -> bool {
    std::env::var("REFDPO_SHARE_PROMPTS").map_or(true, |v| v != "0")
}

/// Refuses a `REFDPO_SHARE_PROMPTS` other than 0 or 1, saying what each means.
pub fn check_share_setting() -> Result<()> {
    let v = match std::env::var("REFDPO_SHARE_PROMPTS") {
        Err(std::env::VarError::NotPresent) => return Ok(()),
        Err(std::env::VarError::NotUnicode(v)) => v.to_string_lossy().into_owned(),
        Ok(v) if v == "0" || v == "1" => return Ok(()),
        Ok(v) => v,
    };
    Err(crate::error::Error::Config(format!(
        "REFDPO_SHARE_PROMPTS={v:?}: it takes 0 (every sequence scored and trained whole, as \
         transformers and TRL do) or 1 (each pair's prompt computed once, the default); unset it \
         for the default"
    )))
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

/// Scores B pairs in one packed forward (no padding; each pair's prompt computed once, unless
/// [`shares_prompts`] says not): (chosen, rejected) summed log-probs per pair.
pub fn score_pairs(
    model: &Transformer,
    pairs: &[PairIds<'_>],
    max_length: usize,
    mode: Truncation,
    device: &Device,
) -> Result<Vec<(f64, f64)>> {
    let batch = if shares_prompts() {
        SeqBatch::pairs_shared(pairs, max_length, mode, device)?
    } else {
        SeqBatch::pairs(pairs, max_length, mode, None, device)?
    };
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
        // [len, V] logits in f32, through Gemma 2's final soft cap where it has one
        let logits = rows.narrow(0, start, len)?.matmul(&lm_head.t()?)?;
        let logits = softcap(logits.to_dtype(DType::F32)?, cap)?;
        if cpu::logits::covers(&logits) {
            // one pass per row on the CPU, in SIMD lanes summed in f64 (no graph: training's
            // forward of the log-probs too, whose backward is [`token_logps_backward`])
            let (lp, lse) = cpu::logits::logp_lse(&logits, &tgt)?;
            logps.push(lp);
            lses.push(lse);
            continue;
        }
        // log p(target) = logit[target] − lse, lse = max + log Σ exp(logit − max), without
        // writing a second [len, V] tensor for the log-softmax.
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
                        let t = softcap::tanh_over(&z, c)?;
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
mod tests;

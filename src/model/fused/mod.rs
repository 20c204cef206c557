//! refdpo's fused ops: each a candle custom op whose forward and backward are one CUDA kernel
//! apiece (`kernels.cu`, built to PTX under `--features cuda`), with a CPU loop that computes the
//! same thing in the same order (what the unit tests hold to the composed candle ops).
//!
//! A forward uses them in [`OpMode::Fused`](crate::model::OpMode): on CUDA by default, on the
//! CPU only when asked (`REFDPO_FUSED=1`, for testing the fused path without a GPU), never when
//! `REFDPO_FUSED=0` (to compare with the composed ops on a GPU); `REFDPO_FUSED=-name` leaves
//! one kernel out ([`setting`]). A differentiable forward in f32 on the CPU (training) also
//! takes RMSNorm, RoPE and SwiGLU ([`OpMode::fuses`](crate::model::OpMode::fuses)): their loops
//! are cheaper than the composed nodes and candle's autograd.

mod accumulate;
pub mod adamw;
pub mod adamw_step;
pub mod attention;
pub mod cubins;
mod elem;
#[cfg(feature = "cuda")]
mod launch;
mod logits;
mod norm;
mod rope;
pub mod setting;
mod swiglu;
pub mod tiled;

pub use attention::AttnSoftmax;
pub use setting::Kernel;

use candle_core::{DType, Device, Result, Tensor};

/// Whether forwards on `device` use the fused ops (see the module's documentation).
pub fn enabled(device: &Device) -> bool {
    setting::current().forced.unwrap_or(device.is_cuda())
}

/// Whether `REFDPO_FUSED=0` asks for candle's composed ops everywhere (no refdpo kernel, the CPU's
/// scoring attention included).
pub fn disabled() -> bool {
    setting::current().forced == Some(false)
}

/// Whether `REFDPO_FUSED` leaves `kernel` out (`0` leaves out every one).
pub fn leaves_out(kernel: Kernel) -> bool {
    setting::current().leaves_out(kernel)
}

/// Attention probabilities of scores [.., rows, keys] (see [`AttnSoftmax`]), in their dtype.
pub fn attention_probs(scores: &Tensor, op: AttnSoftmax) -> Result<Tensor> {
    scores.contiguous()?.apply_op1(op)
}

/// RMSNorm of x [.., h] by w [h] (x's dtype, or f32 for Gemma's 1 + w).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, norm::RmsNormOp { eps })
}

/// RoPE of x [b, heads, t, d] with cos and sin [t, d/2].
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_in(tiled::Order::Bhtd, x, cos, sin)
}

/// RoPE of x with its axes in `order` ([b, t, heads, d] in [`tiled::Order::Bthd`]), cos and
/// sin [t, d/2].
pub fn rope_in(order: tiled::Order, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        rope::RopeOp { sign: 1.0, order },
    )
}

/// silu(gate) · up.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?
        .apply_op2(&up.contiguous()?, swiglu::Swiglu)
}

/// (log p(target), log-sum-exp) [n] f32 each, of logits [n, v] in any float dtype.
pub fn logp_lse(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    let out = logits
        .contiguous()?
        .apply_op2_no_bwd(&targets.contiguous()?, &logits::LogpLse)?;
    Ok((out.get(0)?, out.get(1)?))
}

/// Each row's log-sum-exp and upstream gradient [n] packed as [`logp_grad`] reads them: [2, n]
/// f32, made once for all the vocabulary chunks of a backward.
pub fn lse_and_grad(lse: &Tensor, g: &Tensor) -> Result<Tensor> {
    Tensor::stack(&[lse.to_dtype(DType::F32)?, g.to_dtype(DType::F32)?], 0)
}

/// g · (onehot(target) − softmax) over a vocabulary chunk: logits [n, len] from entry `v0`,
/// with [`lse_and_grad`]'s [2, n] → [n, len] in the logits' dtype.
pub fn logp_grad(logits: &Tensor, targets: &Tensor, lse_g: &Tensor, v0: usize) -> Result<Tensor> {
    logits
        .contiguous()?
        .apply_op3_no_bwd(&targets.contiguous()?, lse_g, &logits::LogpGrad { v0 })
}

/// table [V, H] += each distinct id's rows of g [n, H] (any float dtype), in place: the rows of
/// a token summed in f32 in row order, added into its row and rounded once to the table's
/// dtype; rows whose id is `skip` add nothing. `table` must be contiguous and held by nothing
/// else. One launch on CUDA (`REFDPO_FUSED=-accumulate` leaves it out: the caller composes).
pub fn embed_grad(table: &Tensor, ids: &[u32], skip: Option<u32>, g: &Tensor) -> Result<()> {
    if ids.len() != g.dim(0)? {
        candle_core::bail!(
            "fused embedding gradient: {} ids for {:?} rows",
            ids.len(),
            g.dims()
        )
    }
    table.inplace_op2(
        &g.to_dtype(DType::F32)?.contiguous()?,
        &accumulate::EmbedGrad::of(ids, skip),
    )
}

/// acc += g in place (g any float dtype; the sum in f32, stored in acc's dtype). `acc` must be
/// contiguous and held by nothing else: every tensor sharing its storage sees the change.
/// Without the kernel (`REFDPO_FUSED=-accumulate` or `0`), the sum is composed and copied in.
pub fn accumulate(acc: &Tensor, g: &Tensor) -> Result<()> {
    if leaves_out(Kernel::Accumulate) {
        let sum = (acc.to_dtype(DType::F32)? + g.to_dtype(DType::F32)?)?.to_dtype(acc.dtype())?;
        return acc.slice_set(&sum.contiguous()?, 0, 0);
    }
    acc.inplace_op2(
        &g.to_dtype(DType::F32)?.contiguous()?,
        &accumulate::Accumulate,
    )
}

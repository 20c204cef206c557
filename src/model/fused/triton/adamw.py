"""AdamW in place, in Triton: one launch per moment and one for the weights of each tensor,
instead of a dozen composed ops and three copies. torch's update rule, in this order, for f32
master weights W and moments in the state dtype:

    m <- m * beta1 + (g * grad_scale) * (1 - beta1)                adamw_moment, SQUARE = False
    v <- v * beta2 + (g * grad_scale)^2 * (1 - beta2)              adamw_moment, SQUARE = True
    W <- W * decay - (m / (sqrt(v) * inv_sqrt_bc2 + eps)) * lr_bc1        adamw_weight

with decay = 1 - lr * weight_decay (or 1), lr_bc1 = lr / (1 - beta1^t), inv_sqrt_bc2 =
1 / sqrt(1 - beta2^t) and 1 - beta, all computed in f64 on the host and rounded to f32, as the
composed ops take their scalars. The weights read the stored moments, as torch's AdamW does. A
bf16 moment is rounded stochastically (up with probability equal to its distance from the bf16
value below, from a Philox stream of (seed, element)), so small EMA increments survive on
average. f32 moments and weights are computed op by op as the composed ops compute them (IEEE
division and square root; compile.py turns FP fusion off for these kernels), so they equal
them bit for bit.

Checked on CPU tensors by Triton's interpreter (test_adamw.py) and compiled by compile.py.
"""

import triton
import triton.language as tl


@triton.jit
def _to_bf16_stochastic(x, seed, offs):
    """f32 -> bf16, rounded up with probability (x - below) / spacing: add 16 random low bits
    to the magnitude's bit pattern and truncate (exact values stay)."""
    bits = x.to(tl.uint32, bitcast=True)
    noise = tl.randint(seed, offs).to(tl.uint32) & 0xFFFF
    bits = (bits + noise) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def adamw_moment(
    X, G, n, beta, one_minus_beta, grad_scale, seed,
    SQUARE: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr,
):
    """X <- X * beta + (g * grad_scale) [squared] * (1 - beta), in f32, stored in X's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32) * grad_scale
    if SQUARE:
        g = g * g
    x = x * beta + g * one_minus_beta
    if STOCHASTIC:
        out = _to_bf16_stochastic(x, seed, offs)
    else:
        out = x.to(X.dtype.element_ty)
    tl.store(X + offs, out, mask=mask)


@triton.jit
def adamw_weight(
    W, M, V, n, decay, lr_bc1, inv_sqrt_bc2, eps,
    BLOCK: tl.constexpr,
):
    """W <- W * decay - (m / (sqrt(v) * inv_sqrt_bc2 + eps)) * lr_bc1, in f32."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = tl.load(W + offs, mask=mask, other=0.0)
    m = tl.load(M + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(V + offs, mask=mask, other=0.0).to(tl.float32)
    denom = tl.sqrt_rn(v) * inv_sqrt_bc2 + eps
    w = w * decay - tl.math.div_rn(m, denom) * lr_bc1
    tl.store(W + offs, w, mask=mask)

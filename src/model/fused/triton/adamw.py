"""The optimizer step in Triton, over every trainable tensor at once: three launches per step
(the gradients' sum of squares, the clipping coefficient, AdamW), however many tensors the
model has, where one launch per tensor and moment made hundreds, and no host round trip
between the gradient norm and the update.

The tensors are named by a table of device addresses, PTRS [tensors, 7] int64: the master
weights W (f32, or bf16 with W_BF16), the moments M and V (state dtype), the gradients G (state
dtype), and the seeds of M's, V's and W's stochastic rounding. The work is cut in chunks of at most CHUNK elements of one
tensor, CHUNKS [chunks, 4] int32: (tensor, first element, end, weight decay 0/1); one program
per chunk (apex's multi_tensor_apply layout).

1. grad_sumsq: each chunk's sum of g^2, in f32, to PARTIALS [chunks];
2. clip_norm: one program sums the partials in f64: OUT = [norm, coefficient], the coefficient
   torch's clip_grad_norm_ takes (max_norm / (norm + 1e-6) when below 1, else 1; 1 when
   max_norm <= 0), or NaN when the norm is not finite;
3. adamw_multi, torch's update rule, in this order, for each element:

    m <- m * beta1 + (g * coef) * (1 - beta1)
    v <- v * beta2 + (g * coef)^2 * (1 - beta2)
    W <- W * decay - (m / (sqrt(v) * inv_sqrt_bc2 + eps)) * lr_bc1

with decay = 1 - lr * weight_decay (1 for a tensor without decay), lr_bc1 = lr / (1 - beta1^t),
inv_sqrt_bc2 = 1 / sqrt(1 - beta2^t) and 1 - beta, computed in f64 on the host and rounded to
f32, as the composed ops take their scalars; the coefficient is rounded from f64 to f32, as the
host rounds it. The weights read the stored moments, as torch's AdamW does. A bf16 moment or weight
is rounded stochastically (up with probability equal to its distance from the bf16 value below,
from a Philox stream of (seed, element)), so small EMA increments and updates far below a bf16
spacing survive on average. f32
moments and weights are computed op by op as the composed ops compute them (IEEE division and
square root; compile.py turns FP fusion off for these kernels), so they equal them bit for bit.
A NaN coefficient (a non-finite gradient norm) leaves every weight and moment as it was: the
trainer stops on it.

Checked on CPU tensors by Triton's interpreter (test_adamw.py) and compiled by compile.py.
"""

import triton
import triton.language as tl

# Elements per program (a chunk) and per iteration within it.
CHUNK = 65536
BLOCK = 1024
# int64 words per tensor in PTRS, int32 words per chunk in CHUNKS
PTR_WORDS = 7
CHUNK_WORDS = 4


@triton.jit
def _to_bf16_stochastic(x, seed, offs):
    """f32 -> bf16, rounded up with probability (x - below) / spacing: add 16 random low bits
    to the magnitude's bit pattern and truncate (exact values stay)."""
    bits = x.to(tl.uint32, bitcast=True)
    noise = tl.randint(seed, offs).to(tl.uint32) & 0xFFFF
    bits = (bits + noise) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _state_ptr(PTRS, word, BF16: tl.constexpr):
    """The address in PTRS[word] as a pointer to bf16 or f32."""
    addr = tl.load(PTRS + word)
    if BF16:
        return addr.to(tl.pointer_type(tl.bfloat16))
    else:
        return addr.to(tl.pointer_type(tl.float32))


@triton.jit
def grad_sumsq(PTRS, CHUNKS, PARTIALS, BF16: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """PARTIALS[chunk] <- the sum of g^2 over the chunk, in f32."""
    pid = tl.program_id(0)
    t = tl.load(CHUNKS + pid * 4)
    start = tl.load(CHUNKS + pid * 4 + 1)
    end = tl.load(CHUNKS + pid * 4 + 2)
    G = _state_ptr(PTRS, t * 7 + 3, BF16)
    acc = tl.zeros([BLOCK], tl.float32)
    for off in range(0, CHUNK, BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        g = tl.load(G + offs, mask=offs < end, other=0.0).to(tl.float32)
        acc += g * g
    tl.store(PARTIALS + pid, tl.sum(acc, 0))


@triton.jit
def clip_norm(PARTIALS, n_chunks, OUT, max_norm, BLOCK: tl.constexpr):
    """OUT <- [norm, clipping coefficient] (f64) from the chunks' partial sums of squares."""
    acc = tl.zeros([BLOCK], tl.float64)
    for off in range(0, n_chunks, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        acc += tl.load(PARTIALS + offs, mask=offs < n_chunks, other=0.0).to(tl.float64)
    norm = tl.sqrt(tl.sum(acc, 0))
    coef = max_norm / (norm + 1e-6)
    coef = tl.where((max_norm > 0) & (coef < 1), coef, 1.0)
    # NaN for an infinite or NaN norm (inf - inf and NaN - NaN are NaN, finite - itself is 0)
    coef = tl.where(norm < float("inf"), coef, norm - norm)
    tl.store(OUT, norm)
    tl.store(OUT + 1, coef)


@triton.jit
def adamw_multi(
    PTRS, CHUNKS, COEF, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, lr_bc1, inv_sqrt_bc2,
    eps, BF16: tl.constexpr, W_BF16: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """One AdamW step over the chunk's elements of its tensor (see the module's documentation)."""
    pid = tl.program_id(0)
    coef = tl.load(COEF + 1).to(tl.float32)
    if coef == coef:
        t = tl.load(CHUNKS + pid * 4)
        start = tl.load(CHUNKS + pid * 4 + 1)
        end = tl.load(CHUNKS + pid * 4 + 2)
        w_decay = tl.where(tl.load(CHUNKS + pid * 4 + 3) != 0, decay, 1.0)
        W = _state_ptr(PTRS, t * 7, W_BF16)
        M = _state_ptr(PTRS, t * 7 + 1, BF16)
        V = _state_ptr(PTRS, t * 7 + 2, BF16)
        G = _state_ptr(PTRS, t * 7 + 3, BF16)
        seed_m = tl.load(PTRS + t * 7 + 4).to(tl.int32)
        seed_v = tl.load(PTRS + t * 7 + 5).to(tl.int32)
        seed_w = tl.load(PTRS + t * 7 + 6).to(tl.int32)
        for off in range(0, CHUNK, BLOCK):
            offs = start + off + tl.arange(0, BLOCK)
            mask = offs < end
            g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32) * coef
            m = tl.load(M + offs, mask=mask, other=0.0).to(tl.float32) * beta1 + g * one_minus_beta1
            v = tl.load(V + offs, mask=mask, other=0.0).to(tl.float32) * beta2 + (g * g) * one_minus_beta2
            if BF16:
                m_stored = _to_bf16_stochastic(m, seed_m, offs)
                v_stored = _to_bf16_stochastic(v, seed_v, offs)
                m = m_stored.to(tl.float32)
                v = v_stored.to(tl.float32)
            else:
                m_stored = m
                v_stored = v
            tl.store(M + offs, m_stored, mask=mask)
            tl.store(V + offs, v_stored, mask=mask)
            w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
            denom = tl.sqrt_rn(v) * inv_sqrt_bc2 + eps
            w = w * w_decay - tl.math.div_rn(m, denom) * lr_bc1
            if W_BF16:
                w = _to_bf16_stochastic(w, seed_w, offs)
            tl.store(W + offs, w, mask=mask)

"""The 8-bit AdamW update (`train.optim = "adamw_8bit"`) in Triton: the tensors whose moments are
stored as bitsandbytes' AdamW8bit stores them, each block of QBLOCK = 256 values as one f32
absmax and 256 one-byte indices into a fixed map (signed for m, unsigned for v), all of them in
one launch after adamw.py's `grad_sumsq` and `clip_norm` have taken the norm over every gradient
(the dense tensors' and these).

The tables are adamw.py's, in the same buffers: PTRS [tensors, 7] int64 holds, for such a
tensor, the master weights W (f32, or bf16 with W_BF16), the codes MC and VC (uint8), the
gradient G (state dtype: f32, or bf16 with BF16) at adamw.py's word 3, so that `grad_sumsq`
reads it as a dense tensor's, the absmax MA and VA (f32, one per block) and the seed of W's
stochastic rounding; CHUNKS [chunks, 4] int32 as adamw.py's (tensor, first element, end, weight
decay 0/1), a chunk starting on a block (CHUNK is a multiple of QBLOCK). MAPS [2, 256] holds the
two maps, BOUNDS [2, 256] the 255 midpoints between each map's neighbours, padded with +inf.

Per block, in the order of refdpo's CPU loops (src/train/adamw8.rs), which equal the composed
ops bit for bit:

    m <- (MAP_M[mc] * ma) * beta1 + (g * coef) * (1 - beta1)
    v <- (MAP_V[vc] * va) * beta2 + ((g * coef) * (g * coef)) * (1 - beta2)
    W <- W * decay - (m / (sqrt(v) * inv_sqrt_bc2 + eps)) * lr_bc1
    absmax <- max |x| over the block; code <- the number of midpoints below x * (1 / absmax)

with each value clamped to [-1, 1] first, so a value on a midpoint takes the lower entry, as
bitsandbytes' `bucketize` does. f32 weights and every code and absmax equal the CPU loops' (IEEE
division and square root, no fused multiply-adds: compile.py turns FP fusion off); bf16 weights
are rounded stochastically, as adamw.py's are. A NaN coefficient leaves everything as it was.

Checked on CPU tensors by Triton's interpreter (test_adamw8.py) and compiled by compile.py.
"""

import triton
import triton.language as tl

from adamw import _state_ptr, _to_bf16_stochastic

# Values per absmax (bitsandbytes' blocksize) and blocks per iteration within a chunk.
QBLOCK = 256
ROWS = 4


@triton.jit
def _byte_ptr(PTRS, word):
    return tl.load(PTRS + word).to(tl.pointer_type(tl.uint8))


@triton.jit
def _f32_ptr(PTRS, word):
    return tl.load(PTRS + word).to(tl.pointer_type(tl.float32))


@triton.jit
def _quantize(x, mask, BOUNDS):
    """Each row of x [ROWS, QBLOCK] (where mask) as codes (int32) and its absmax [ROWS]."""
    top = tl.max(tl.where(mask, tl.abs(x), 0.0), 1)
    inv = tl.math.div_rn(tl.full(top.shape, 1.0, tl.float32), tl.maximum(top, 1e-38))
    q = tl.minimum(tl.maximum(x * inv[:, None], -1.0), 1.0)
    # an all-zero block: 0 / 1e-38, without trusting the subnormal to survive
    q = tl.where(top[:, None] > 0, q, 0.0)
    idx = tl.zeros(x.shape, tl.int32)
    for i in tl.static_range(8):
        half = 128 >> i
        below = tl.load(BOUNDS + idx + (half - 1)) < q
        idx += tl.where(below, half, 0)
    return idx, top


@triton.jit
def adamw8_multi(
    PTRS, CHUNKS, COEF, MAPS, BOUNDS, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, lr_bc1,
    inv_sqrt_bc2, eps, BF16: tl.constexpr, W_BF16: tl.constexpr, CHUNK: tl.constexpr,
    QBLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    """One 8-bit AdamW step over the chunk's blocks of its tensor (see the module's
    documentation)."""
    pid = tl.program_id(0)
    coef = tl.load(COEF + 1).to(tl.float32)
    if coef == coef:
        t = tl.load(CHUNKS + pid * 4)
        start = tl.load(CHUNKS + pid * 4 + 1)
        end = tl.load(CHUNKS + pid * 4 + 2)
        w_decay = tl.where(tl.load(CHUNKS + pid * 4 + 3) != 0, decay, 1.0)
        W = _state_ptr(PTRS, t * 7, W_BF16)
        MC = _byte_ptr(PTRS, t * 7 + 1)
        VC = _byte_ptr(PTRS, t * 7 + 2)
        G = _state_ptr(PTRS, t * 7 + 3, BF16)
        MA = _f32_ptr(PTRS, t * 7 + 4)
        VA = _f32_ptr(PTRS, t * 7 + 5)
        seed_w = tl.load(PTRS + t * 7 + 6).to(tl.int32)
        rows = tl.arange(0, ROWS)
        cols = tl.arange(0, QBLOCK)
        for off in range(0, CHUNK, ROWS * QBLOCK):
            first = start + off + rows * QBLOCK  # each row's first element
            offs = first[:, None] + cols[None, :]
            mask = offs < end
            row_mask = first < end
            block = first // QBLOCK
            g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32) * coef
            mc = tl.load(MC + offs, mask=mask, other=0).to(tl.int32)
            vc = tl.load(VC + offs, mask=mask, other=0).to(tl.int32)
            ma = tl.load(MA + block, mask=row_mask, other=0.0)
            va = tl.load(VA + block, mask=row_mask, other=0.0)
            m = (tl.load(MAPS + mc) * ma[:, None]) * beta1 + g * one_minus_beta1
            v = (tl.load(MAPS + QBLOCK + vc) * va[:, None]) * beta2 + (g * g) * one_minus_beta2
            w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
            denom = tl.sqrt_rn(v) * inv_sqrt_bc2 + eps
            w = w * w_decay - tl.math.div_rn(m, denom) * lr_bc1
            if W_BF16:
                w = _to_bf16_stochastic(w, seed_w, offs)
            tl.store(W + offs, w, mask=mask)
            mq, m_top = _quantize(m, mask, BOUNDS)
            vq, v_top = _quantize(v, mask, BOUNDS + QBLOCK)
            tl.store(MC + offs, mq.to(tl.uint8), mask=mask)
            tl.store(VC + offs, vq.to(tl.uint8), mask=mask)
            tl.store(MA + block, m_top, mask=row_mask)
            tl.store(VA + block, v_top, mask=row_mask)

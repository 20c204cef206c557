"""Host side of the tiled attention for Python: grids, strides, arguments and an autograd
Function, the rules refdpo's Rust launcher follows too. Used by the interpreter tests on the CPU
and by the device check on a GPU, where the same calls launch either Triton's JIT build of
flash_attn.py or the committed cubins (`cubin.py`).

Tensors are [B, T, H, D] ("bthd") or [B, H, T, D] ("bhtd"); `cu` holds int32 sequence offsets
into the flat token axis of B * T tokens (see flash_attn.py), and `cu_q` (default `cu`) those of
the queries' axis, where each sequence's queries are its last positions (a shared prompt's).
"""

import torch
import triton

import flash_attn
from flash_attn import CONFIGS


def block_d(head_dim):
    return triton.next_power_of_2(head_dim)


def tiles(head_dim, interpret=False):
    """(BLOCK_M, BLOCK_N): small in the interpreter, whose cost grows with the tile; else the
    compiled configuration of the head-dim tile."""
    if interpret or block_d(head_dim) not in CONFIGS:
        return 16, 16
    return CONFIGS[block_d(head_dim)][:2]


def jit(kernel, grid, args, consts):
    """Launch through Triton's JIT (or its interpreter)."""
    getattr(flash_attn, kernel)[grid](*args, **consts)


def _strides(x, layout):
    sb, s1, s2, _ = x.stride()
    assert x.stride(3) == 1, "the head dim must be contiguous"
    # (batch, token, head)
    return (sb, s1, s2) if layout == "bthd" else (sb, s2, s1)


def _dims(x, layout):
    b, a1, a2, d = x.shape
    return (b, a1, a2, d) if layout == "bthd" else (b, a2, a1, d)  # (B, T, H, D)


def max_len(cu):
    return int((cu[1:] - cu[:-1]).max().item())


def forward(q, k, v, cu, layout="bthd", window=0, scale=None, softcap=0.0, interpret=False, launch=jit,
            cu_q=None):
    """(o in q's layout and dtype, lse f32 [Hq, B*Tq])."""
    b, tq, hq, d = _dims(q, layout)
    _, t, hkv, _ = _dims(k, layout)
    cu_q = cu if cu_q is None else cu_q
    scale = d ** -0.5 if scale is None else scale
    o = torch.zeros_like(q)
    n = b * tq
    lse = torch.zeros((hq, n), dtype=torch.float32, device=q.device)
    bm, bn = tiles(d, interpret)
    grid = (triton.cdiv(max_len(cu), bm), cu.numel() - 1, hq)
    args = (
        q, k, v, o, lse, cu, cu_q,
        *_strides(q, layout), *_strides(k, layout), *_strides(v, layout), *_strides(o, layout),
        t, tq, n, d, hq // hkv, window, float(scale), float(softcap or 1.0),
    )
    launch("flash_fwd", grid, args, dict(BLOCK_D=block_d(d), BLOCK_M=bm, BLOCK_N=bn, SOFTCAP=bool(softcap)))
    return o, lse


def backward(q, k, v, o, lse, do, cu, layout="bthd", window=0, scale=None, softcap=0.0, interpret=False,
             launch=jit, cu_q=None):
    """(dq, dk, dv) in the inputs' layouts and dtypes."""
    b, tq, hq, d = _dims(q, layout)
    _, t, hkv, _ = _dims(k, layout)
    cu_q = cu if cu_q is None else cu_q
    scale = d ** -0.5 if scale is None else scale
    n = b * tq
    do = do.contiguous() if do.stride(3) != 1 else do
    delta = torch.zeros((hq, n), dtype=torch.float32, device=q.device)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    bm, bn = tiles(d, interpret)
    seqs = cu.numel() - 1
    ml = max_len(cu)
    launch(
        "flash_bwd_delta", (triton.cdiv(max_len(cu_q), bm), seqs, hq),
        (o, do, delta, cu_q, *_strides(o, layout), *_strides(do, layout), tq, n, d),
        dict(BLOCK_D=block_d(d), BLOCK_M=bm),
    )
    common = (t, tq, n, d, hq // hkv, window, float(scale), float(softcap or 1.0))
    consts = dict(BLOCK_D=block_d(d), BLOCK_M=bm, BLOCK_N=bn, SOFTCAP=bool(softcap))
    ins = (*_strides(q, layout), *_strides(k, layout), *_strides(v, layout), *_strides(do, layout))
    launch(
        "flash_bwd_dkdv", (triton.cdiv(ml, bn), seqs, hkv),
        (q, k, v, do, lse, delta, dk, dv, cu, cu_q, *ins, *_strides(dk, layout), *_strides(dv, layout), *common),
        consts,
    )
    launch(
        "flash_bwd_dq", (triton.cdiv(ml, bm), seqs, hq),
        (q, k, v, do, lse, delta, dq, cu, cu_q, *ins, *_strides(dq, layout), *common),
        consts,
    )
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, layout, window, scale, softcap, interpret, launch, cu_q):
        o, lse = forward(q, k, v, cu, layout, window, scale, softcap, interpret, launch, cu_q)
        ctx.save_for_backward(q, k, v, o, lse, cu, cu if cu_q is None else cu_q)
        ctx.args = (layout, window, scale, softcap, interpret, launch)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu, cu_q = ctx.saved_tensors
        dq, dk, dv = backward(q, k, v, o, lse, do, cu, *ctx.args, cu_q=cu_q)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def flash_attention(q, k, v, cu, layout="bthd", window=0, scale=None, softcap=0.0, interpret=False, launch=jit,
                    cu_q=None):
    return FlashAttention.apply(q, k, v, cu, layout, window, scale, softcap, interpret, launch, cu_q)

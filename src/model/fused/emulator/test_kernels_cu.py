"""`../kernels.cu` run on the CPU (`emulator.py`) against torch, kernel by kernel, in f32, bf16 and
f16: the very source the GPU runs, not the Rust CPU twins in `../*.rs`.

Launch shapes are the ones `../launch.rs` gives (`per_row`, `elementwise`, and the RMSNorm
backward's `min(rows, 1024)` blocks), plus the smallest and largest blocks and grids smaller than
the work, so that every block-size-dependent reduction and grid-stride loop is exercised. Outputs
start as NaN, so an element a kernel fails to write shows. References are in f32 or f64 with the
roundings transformers makes (the kernels' comments name them); tolerances are a few ulps of the
output dtype (the GPU's and glibc's expf differ by an ulp or two, as the emulator's header says).
"""

import math
import os
import re

import pytest
import torch

from emulator import F32, U32, Emulator

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# Relative tolerance per output dtype: about two ulps.
RTOL = {"f32": 4e-6, "bf16": 2 ** -7, "f16": 2 ** -9}


@pytest.fixture(scope="module")
def emu():
    return Emulator()


def row_threads(cols):
    """`launch.rs::row_threads`: about four elements per thread, a multiple of 32, at most 1024."""
    return min(max((-(-cols // 4) + 31) // 32 * 32, 32), 1024)


def per_row(rows, cols):
    return rows, row_threads(cols)


def elementwise(n):
    return min(max(-(-n // 256), 1), 1 << 16), 256


def nan_like(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def close(out, ref, suffix, atol=0.0):
    torch.testing.assert_close(out.double(), ref.double(), rtol=RTOL[suffix], atol=atol,
                               equal_nan=False)


def ordinal(t):
    """Bit patterns in the order of the values they encode (adjacent floats differ by 1)."""
    bits = t.view({2: torch.int16, 4: torch.int32}[t.element_size()]).long()
    magnitude = bits & ((1 << (8 * t.element_size() - 1)) - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def same_rounding(out, ref, suffix):
    """`out` against a reference that rounds where the kernel does: in the half types at most an
    ulp apart (the exp of the GPU, of glibc and of torch may differ in the last bit before the
    rounding) and 98% identical, which a misplaced rounding breaks; in f32 a few ulps (the
    reductions' order)."""
    assert out.dtype == ref.dtype
    ulps = (ordinal(out) - ordinal(ref)).abs()
    equal = (ulps == 0).double().mean().item()
    print(f"{suffix}: max {ulps.max().item()} ulps, {equal:.4f} identical")
    assert ulps.max() <= (8 if suffix == "f32" else 1), ulps.max()
    assert suffix == "f32" or equal >= 0.98, equal


def test_every_kernel_in_kernels_cu_is_registered(emu):
    with open(os.path.join(os.path.dirname(__file__), "..", "kernels.cu")) as f:
        src = f.read()
    floats = re.findall(r"__global__ void (\w+)_##S\(", src)
    halves = re.findall(r"__global__ void (\w+)_##S##_wf32\(", src)
    assert len(floats) == 11 and len(halves) == 2, (floats, halves)
    want = {f"{k}_{s}" for k in floats for s in DTYPES}
    want |= {f"{k}_{s}_wf32" for k in halves for s in ("bf16", "f16")}
    assert emu.kernels() == want


def test_an_unknown_kernel_or_a_partial_warp_is_refused(emu):
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="returned -1"):
        emu.launch("no_such_kernel", 1, 32, x)
    with pytest.raises(ValueError, match="returned -2"):
        emu.launch("accumulate_f32", 1, 48, x, x, U32(4))


# --- attention's row op -----------------------------------------------------------------------


def softmax_rows_ref(x, group_rows, q_offset, window, scale, dtype):
    rows, cols = x.shape
    s = (x.float() * scale).to(dtype).float()
    q = torch.arange(rows) % group_rows + q_offset
    j = torch.arange(cols)
    seen = j[None, :] <= q[:, None]
    if window:
        seen &= j[None, :] > q[:, None] - window
    p = torch.softmax(s.masked_fill(~seen, float("-inf")), dim=-1)
    return torch.nan_to_num(p, nan=0.0).to(dtype), seen


@pytest.mark.parametrize("suffix", DTYPES)
@pytest.mark.parametrize("cols, group_rows, q_offset, window, block", [
    (37, 5, 32, 0, None),      # decode-like: queries at the end of the keys, 2 groups (GQA)
    (200, 200, 0, 0, None),    # square causal, one group, several warps
    (200, 200, 0, 48, 32),     # sliding window, one warp striding over the row
    (130, 3, 127, 0, 1024),    # more threads than columns
    (64, 4, 100, 16, None),    # every key outside the window: a zero row, not NaN
])
def test_attn_softmax_fwd(emu, suffix, cols, group_rows, q_offset, window, block):
    dtype = DTYPES[suffix]
    rows = 2 * group_rows
    g = torch.Generator().manual_seed(cols + group_rows + window)
    x = (torch.randn(rows, cols, generator=g) * 16).to(dtype)  # scaled scores of std 2
    y = nan_like((rows, cols), dtype)
    scale = 1 / math.sqrt(96)  # not a power of two: the scaled scores round
    grid, threads = per_row(rows, cols)
    emu.launch(f"attn_softmax_fwd_{suffix}", grid, block or threads, x, y, U32(cols),
               U32(group_rows), U32(q_offset), U32(window), F32(scale))
    ref, seen = softmax_rows_ref(x, group_rows, q_offset, window, scale, dtype)
    assert not y.isnan().any()
    assert (y.float()[~seen] == 0).all()
    same_rounding(y, ref, suffix)


@pytest.mark.parametrize("suffix", DTYPES)
@pytest.mark.parametrize("cols, block", [(37, None), (300, None), (300, 32), (50, 1024)])
def test_attn_softmax_bwd(emu, suffix, cols, block):
    dtype = DTYPES[suffix]
    rows = 6
    g = torch.Generator().manual_seed(cols)
    p = torch.softmax(torch.randn(rows, cols, generator=g) * 3, -1).to(dtype)
    dy = torch.randn(rows, cols, generator=g).to(dtype)
    dx = nan_like((rows, cols), dtype)
    scale = 0.125
    grid, threads = per_row(rows, cols)
    emu.launch(f"attn_softmax_bwd_{suffix}", grid, block or threads, p, dy, dx, U32(cols),
               F32(scale))
    pf, gf = p.double(), dy.double()
    ref = scale * pf * (gf - (pf * gf).sum(-1, keepdim=True))
    close(dx, ref, suffix, atol=1e-6 if suffix == "f32" else 1e-3)


# --- RMSNorm ----------------------------------------------------------------------------------


NORMS = [("f32", False), ("bf16", False), ("f16", False), ("bf16", True), ("f16", True)]


def norm_kernel(direction, suffix, wf32):
    return f"rms_norm_{direction}_{suffix}" + ("_wf32" if wf32 else "")


@pytest.mark.parametrize("suffix, wf32", NORMS)
@pytest.mark.parametrize("h, block", [(96, None), (576, None), (576, 32), (40, 1024)])
def test_rms_norm_fwd(emu, suffix, wf32, h, block):
    dtype = DTYPES[suffix]
    rows, eps = 5, 1e-5
    g = torch.Generator().manual_seed(h)
    x = (torch.randn(rows, h, generator=g) * 2).to(dtype)
    w = (1 + torch.randn(h, generator=g) * 0.1).to(torch.float32 if wf32 else dtype)
    y = nan_like((rows, h), dtype)
    grid, threads = per_row(rows, h)
    emu.launch(norm_kernel("fwd", suffix, wf32), grid, block or threads, x, w, y, U32(h), F32(eps))
    xf = x.float()
    n = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    # transformers: the normalized row in the compute dtype times the weight; Gemma's (1 + w)
    # in f32 times the f32 row, rounded once.
    ref = (n * w if wf32 else n.to(dtype).float() * w.float()).to(dtype)
    same_rounding(y, ref, suffix)


@pytest.mark.parametrize("suffix, wf32", NORMS)
@pytest.mark.parametrize("rows, h, blocks, block", [
    (5, 96, None, None),    # launch.rs: a block per row (up to 1024)
    (7, 576, 3, None),      # fewer blocks than rows: each sums its rows' dw
    (4, 40, 1, 1024),
])
def test_rms_norm_bwd(emu, suffix, wf32, rows, h, blocks, block):
    dtype = DTYPES[suffix]
    eps = 1e-6
    gen = torch.Generator().manual_seed(rows * h)
    x = torch.randn(rows, h, generator=gen).to(dtype)
    w = (1 + torch.randn(h, generator=gen) * 0.1).to(torch.float32 if wf32 else dtype)
    dy = torch.randn(rows, h, generator=gen).to(dtype)
    blocks = blocks or min(max(rows, 1), 1024)
    out = nan_like((rows + blocks, h), torch.float32)
    _, threads = per_row(blocks, h)
    emu.launch(norm_kernel("bwd", suffix, wf32), blocks, block or threads, x, w, dy, out,
               U32(rows), U32(h), F32(eps))
    xd = x.double().requires_grad_()
    wd = w.double().requires_grad_()
    y = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * wd
    y.backward(dy.double())
    # f32 outputs from inputs in the compute dtype: the sums' f32 rounding only.
    torch.testing.assert_close(out[:rows].double(), xd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[rows:].double().sum(0), wd.grad, rtol=1e-5, atol=1e-5)


# --- RoPE, SwiGLU -----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", DTYPES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("launch", ["rust", "small grid"])
@pytest.mark.parametrize("order", ["bhtd", "bthd"])
def test_rope(emu, suffix, sign, launch, order):
    dtype = DTYPES[suffix]
    b, heads, t, half = 2, 3, 7, 16
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(b, heads, t, 2 * half, generator=gen).to(dtype)
    ang = torch.arange(t)[:, None] * (10000 ** (-torch.arange(half) / half))[None, :]
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    # [b, t, heads, d] is the same rows with each position's heads together (inner = heads)
    xin = x if order == "bhtd" else x.transpose(1, 2).contiguous()
    inner = 1 if order == "bhtd" else heads
    y = nan_like(xin.shape, dtype)
    pairs = x.numel() // 2
    grid, block = elementwise(pairs) if launch == "rust" else (2, 32)
    emu.launch(f"rope_{suffix}", grid, block, xin, cos, sin, y, U32(pairs), U32(t), U32(inner),
               U32(half), F32(sign))
    if order == "bthd":
        y = y.transpose(1, 2)

    def r(v):
        return v.to(dtype).float()

    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    c, s = cos.float(), sign * sin.float()
    ref = torch.cat([r(x1 * c) - r(x2 * s), r(x2 * c) + r(x1 * s)], -1).to(dtype)
    same_rounding(y, ref, suffix)


@pytest.mark.parametrize("suffix", DTYPES)
@pytest.mark.parametrize("launch", ["rust", "small grid"])
def test_swiglu_fwd_and_bwd(emu, suffix, launch):
    dtype = DTYPES[suffix]
    n = 1000
    gen = torch.Generator().manual_seed(3)
    gate = (torch.randn(n, generator=gen) * 3).to(dtype)
    up = torch.randn(n, generator=gen).to(dtype)
    dy = torch.randn(n, generator=gen).to(dtype)
    grid, block = elementwise(n) if launch == "rust" else (3, 32)
    y = nan_like((n,), dtype)
    emu.launch(f"swiglu_fwd_{suffix}", grid, block, gate, up, y, U32(n))
    a = gate.float()
    silu = (a / (1 + torch.exp(-a))).to(dtype).float()
    same_rounding(y, (silu * up.float()).to(dtype), suffix)

    out = nan_like((2, n), dtype)
    emu.launch(f"swiglu_bwd_{suffix}", grid, block, gate, up, dy, out, U32(n))
    ad = gate.double().requires_grad_()
    (torch.nn.functional.silu(ad) * up.double()).backward(dy.double())
    close(out[0], ad.grad, suffix, atol=1e-6 if suffix == "f32" else 1e-3)
    same_rounding(out[1], (dy.float() * silu).to(dtype), suffix)


# --- log-probs and their gradient, accumulation ------------------------------------------------


@pytest.mark.parametrize("suffix", DTYPES)
@pytest.mark.parametrize("v, block", [(1000, None), (50, None), (5000, 32), (100, 1024)])
def test_logp_lse(emu, suffix, v, block):
    dtype = DTYPES[suffix]
    n = 5
    gen = torch.Generator().manual_seed(v)
    z = (torch.randn(n, v, generator=gen) * 5).to(dtype)
    target = torch.randint(0, v, (n,), generator=gen, dtype=torch.int32)
    target[2] = v  # outside the vocabulary: NaN
    target[3] = v - 1
    out = nan_like((2, n), torch.float32)
    grid, threads = per_row(n, v)
    emu.launch(f"logp_lse_{suffix}", grid, block or threads, z, target, out, U32(n), U32(v))
    zd = z.double()
    lse = torch.logsumexp(zd, -1)
    ok = target < v
    logp = zd[ok].gather(-1, target[ok].long()[:, None])[:, 0] - lse[ok]
    torch.testing.assert_close(out[1].double(), lse, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(out[0][ok].double(), logp, rtol=2e-6, atol=2e-5)
    assert out[0][2].isnan()


@pytest.mark.parametrize("block", [None, 32])
def test_logp_lse_keeps_a_vocabularys_small_terms(emu, block):
    """One logit of 0 and 49,151 of -16.7: each exp(-16.7) = 5.6e-8 is below half an f32 ulp of the
    top thread's running sum (about 1), so summing in f32 dropped that thread's share (47 terms at
    a block of 1,024, 1,535 at 32) and the log-sum-exp came out low, on every row alike. In f64
    the sum keeps them: the log-sum-exp is within a twentieth of that loss of the exact one."""
    v = 49_152
    z = torch.full((2, v), -16.7)
    z[0, 0] = 0.0
    z[1, v - 1] = 0.0  # the top logit in the last thread's share
    target = torch.tensor([0, 5], dtype=torch.int32)
    out = nan_like((2, 2), torch.float32)
    emu.launch("logp_lse_f32", 2, block or row_threads(v), z, target, out, U32(2), U32(v))
    lse = torch.logsumexp(z.double(), -1)
    dropped = 47 * math.exp(-16.7)  # the least the f32 sum lost (block 1,024)
    assert (out[1].double() - lse).abs().max() < dropped / 20, (out[1].double() - lse, dropped)
    logp = z.double().gather(-1, target.long()[:, None])[:, 0] - lse
    half_ulp = logp.abs() * 2 ** -24  # the log-prob's own rounding to f32
    assert ((out[0].double() - logp).abs() <= half_ulp + dropped / 20).all()


@pytest.mark.parametrize("suffix", DTYPES)
@pytest.mark.parametrize("launch", ["rust", "small grid"])
def test_logp_grad(emu, suffix, launch):
    dtype = DTYPES[suffix]
    n, vocab, v0, length = 4, 300, 100, 120
    gen = torch.Generator().manual_seed(11)
    full = (torch.randn(n, vocab, generator=gen) * 4).to(dtype)
    z = full[:, v0:v0 + length].contiguous()
    target = torch.tensor([105, 3, 219, 220], dtype=torch.int32)  # in, before, last, after chunk
    lse = torch.logsumexp(full.double(), -1)
    up = torch.randn(n, generator=gen, dtype=torch.float64)
    lg = torch.cat([lse, up]).float()
    dz = nan_like((n, length), dtype)
    grid, block = elementwise(n * length) if launch == "rust" else (2, 64)
    emu.launch(f"logp_grad_{suffix}", grid, block, z, target, lg, dz, U32(n), U32(length),
               U32(v0))
    fd = full.double().requires_grad_()
    logp = torch.log_softmax(fd, -1).gather(-1, target.long()[:, None])[:, 0]
    (logp * up).sum().backward()
    close(dz, fd.grad[:, v0:v0 + length], suffix, atol=1e-6 if suffix == "f32" else 2e-3)


@pytest.mark.parametrize("suffix", DTYPES)
@pytest.mark.parametrize("launch", ["rust", "small grid"])
def test_accumulate_rounds_once(emu, suffix, launch):
    dtype = DTYPES[suffix]
    n = 777
    gen = torch.Generator().manual_seed(5)
    acc = torch.randn(n, generator=gen).to(dtype)
    g = torch.randn(n, generator=gen) * 1e-3
    ref = (acc.float() + g).to(dtype)
    grid, block = elementwise(n) if launch == "rust" else (1, 32)
    emu.launch(f"accumulate_{suffix}", grid, block, acc, g, U32(n))
    assert torch.equal(acc, ref)


@pytest.mark.parametrize("suffix", DTYPES)
@pytest.mark.parametrize("block", [None, 32])
def test_embed_grad_sums_each_tokens_rows_in_f32_and_rounds_once(emu, suffix, block):
    """The embedding's gradient: each distinct token's rows of g summed in row order in f32,
    added into its table row, rounded once; other rows untouched."""
    dtype = DTYPES[suffix]
    vocab, h, n = 50, 99, 300
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 12, (n,), generator=gen)
    ids[::7] = 40  # a frequent token: a long sum
    table = torch.randn(vocab, h, generator=gen).to(dtype)
    g = torch.randn(n, h, generator=gen) * 1e-2
    tokens = torch.unique(ids)
    order = torch.cat([torch.nonzero(ids == t)[:, 0] for t in tokens])
    counts = torch.tensor([int((ids == t).sum()) for t in tokens])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    ref = table.clone()
    for t, s0, s1 in zip(tokens.tolist(), starts[:-1].tolist(), starts[1:].tolist()):
        s = torch.zeros(h, dtype=torch.float32)
        for r in order[s0:s1].tolist():
            s = s + g[r]  # f32, in row order, as the kernel adds
        ref[t] = (table[t].float() + s).to(dtype)
    acc = table.clone()
    grid, threads = per_row(len(tokens), h)
    emu.launch(f"embed_grad_{suffix}", grid, block or threads, acc, g,
               order.to(torch.int32), starts.to(torch.int32), tokens.to(torch.int32), U32(h))
    assert torch.equal(acc, ref)
    assert torch.equal(acc[41:], table[41:]) and torch.equal(acc[12:40], table[12:40])


def test_every_kernel_ran(emu):
    """Last in the file: every registered kernel was launched by a test above."""
    assert emu.launched == emu.kernels(), sorted(emu.kernels() - emu.launched)

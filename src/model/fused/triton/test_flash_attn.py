"""The tiled attention's own source (flash_attn.py), run on CPU tensors by Triton's interpreter,
against the composed ops: scores, soft cap, mask and softmax written out in float64 per
sequence, as transformers' eager attention computes them. Forward and every input's gradient;
causal, sliding-window, grouped-query, soft-capped, padded and packed batches, both layouts, and
fewer queries than keys (a shared prompt).

    TRITON_INTERPRET=1 python -m pytest src/model/fused/triton -q

Without TRITON_INTERPRET=1 and with a GPU, the same tests run the compiled kernels on it
(`bench/device.sh`).
"""

import os

import pytest
import torch

from host import flash_attention

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"


def reference(q, k, v, cu, layout, window, scale, softcap, dtype=torch.float64):
    """The composed ops, one sequence at a time; tokens outside cu stay 0. In float64, or in
    `dtype` as transformers' eager attention rounds: scores in it, softmax in f32, cast back."""
    def flat(x):
        x = x if layout == "bthd" else x.transpose(1, 2)
        b, t, h, d = x.shape
        return x.reshape(b * t, h, d).to(dtype)

    qf, kf, vf = flat(q), flat(k), flat(v)
    groups = qf.shape[1] // kf.shape[1]
    out = torch.zeros_like(qf)
    for a, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs = qf[a:e].transpose(0, 1)
        ks = kf[a:e].transpose(0, 1).repeat_interleave(groups, 0)
        vs = vf[a:e].transpose(0, 1).repeat_interleave(groups, 0)
        s = qs @ ks.transpose(1, 2) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        i = torch.arange(e - a)[:, None]
        j = torch.arange(e - a)[None, :]
        seen = j <= i
        if window:
            seen &= i - j < window
        s = s.float() if dtype != torch.float64 else s
        p = torch.softmax(s.masked_fill(~seen.to(s.device), float("-inf")), -1).to(dtype)
        out[a:e] = (p @ vs).transpose(0, 1)
    b, t = (q.shape[0], q.shape[1]) if layout == "bthd" else (q.shape[0], q.shape[2])
    out = out.reshape(b, t, *out.shape[1:])
    return out if layout == "bthd" else out.transpose(1, 2)


def make(shape_b, t, hq, hkv, d, layout, dtype, gain=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(h):
        shape = (shape_b, t, h, d) if layout == "bthd" else (shape_b, h, t, d)
        return (torch.randn(shape, generator=g) * gain).to(dtype).to(DEVICE)

    return rand(hq), rand(hkv), rand(hkv), torch.randn(
        (shape_b, t, hq, d) if layout == "bthd" else (shape_b, hq, t, d), generator=g
    ).to(dtype).to(DEVICE)


def rel(a, b):
    """max |a − b| over max |b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


CASES = {
    # name: (B, T, Hq, Hkv, D, lengths per flat axis (None: padded rows), window, softcap, layout)
    "causal_padded": (2, 37, 2, 2, 16, None, 0, 0.0, "bthd"),
    "gqa_packed": (1, 56, 4, 2, 16, [5, 17, 33, 1], 0, 0.0, "bhtd"),
    "window_gqa_packed": (1, 56, 4, 1, 16, [20, 35, 1], 7, 0.0, "bthd"),
    "window_wider_than_tile": (2, 45, 2, 1, 16, None, 19, 0.0, "bhtd"),
    # Tiles past the window's edge and before the diagonal, seen whole (no mask), between masked
    # ones on both sides; a length off the tile grid.
    "window_across_tiles": (1, 100, 2, 1, 16, [93, 7], 40, 0.0, "bthd"),
    "softcap_gqa": (2, 33, 4, 2, 16, None, 0, 5.0, "bthd"),
    "softcap_window_packed": (1, 50, 2, 1, 16, [31, 19], 9, 3.0, "bhtd"),
    "head_dim_24": (1, 40, 2, 2, 24, [23, 17], 0, 0.0, "bthd"),
}


def offsets(b, t, lengths):
    if lengths is None:
        return torch.arange(0, b * t + 1, t, dtype=torch.int32)
    assert sum(lengths) == b * t
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_and_gradients_equal_the_composed_ops(name, dtype):
    b, t, hq, hkv, d, lengths, window, softcap, layout = CASES[name]
    gain = 3.0 if softcap else 1.0  # scores past the cap's knee
    q, k, v, do = make(b, t, hq, hkv, d, layout, dtype, gain)
    cu = offsets(b, t, lengths).to(DEVICE)
    scale = d ** -0.5
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    o = flash_attention(q, k, v, cu, layout, window, scale, softcap, INTERPRET)
    (dq, dk, dv) = torch.autograd.grad(o, (q, k, v), do)

    # The reference from the very same input values, in float64.
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference(q64, k64, v64, cu.cpu(), layout, window, scale, softcap)
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), do.double())

    errors = {"o": rel(o, ref), "dq": rel(dq, rq), "dk": rel(dk, rk), "dv": rel(dv, rv)}
    if dtype == torch.float32:
        # The kernels' own f32 arithmetic (measured up to 1e-6).
        assert all(e < 3e-6 for e in errors.values()), (name, dtype, errors)
        return
    # bf16/f16: P and dS are rounded before their dots, as every flash attention does. Held to
    # the composed ops run in the same dtype (transformers' eager rounding): no farther from
    # float64 than three times their distance (measured: up to 2.5x on these small shapes,
    # where one element sets the max), plus an f32 floor.
    qc, kc, vc = (x.detach().requires_grad_() for x in (q, k, v))
    comp = reference(qc, kc, vc, cu.cpu(), layout, window, scale, softcap, dtype)
    cq, ck, cv = torch.autograd.grad(comp, (qc, kc, vc), do)
    eager = {"o": rel(comp, ref), "dq": rel(cq, rq), "dk": rel(ck, rk), "dv": rel(cv, rv)}
    assert all(errors[n] <= 3 * eager[n] + 1e-6 for n in errors), (name, dtype, errors, eager)


def test_an_unseen_row_of_a_window_is_not_nan():
    # Query 40 of a 7-wide window sees only keys 34..40: the first key tiles of its query tile
    # are wholly masked for it, which must not poison the online softmax.
    b, t, hq, hkv, d, window = 1, 48, 1, 1, 16, 7
    q, k, v, _ = make(b, t, hq, hkv, d, "bthd", torch.float32)
    cu = offsets(b, t, None).to(DEVICE)
    o = flash_attention(q, k, v, cu, "bthd", window, d ** -0.5, 0.0, INTERPRET)
    assert torch.isfinite(o).all()
    ref = reference(q, k, v, cu.cpu(), "bthd", window, d ** -0.5, 0.0)
    assert rel(o, ref) < 2e-5


def test_packing_equals_the_padded_batch():
    # The same two sequences, padded to a batch of rows and packed end to end: equal outputs
    # and gradients on the real tokens (the padded rows' tail is causal, so it changes nothing).
    d, h = 16, 2
    lens = [13, 29]
    t = max(lens)
    g = torch.Generator().manual_seed(3)
    seqs = [[torch.randn((n, h, d), generator=g) for _ in range(4)] for n in lens]
    padded = [torch.zeros((2, t, h, d)) for _ in range(4)]
    for i, s in enumerate(seqs):
        for x, p in zip(s, padded):
            p[i, : lens[i]] = x
    packed = [torch.cat([s[j] for s in seqs])[None] for j in range(4)]

    def run(xs, cu):
        q, k, v, do = (x.to(DEVICE).clone() for x in xs)
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        o = flash_attention(q, k, v, cu.to(DEVICE), "bthd", 0, d ** -0.5, 0.0, INTERPRET)
        return (o, *torch.autograd.grad(o, (q, k, v), do))

    a = run(padded, offsets(2, t, None))
    b = run(packed, offsets(1, sum(lens), lens))
    for x, y in zip(a, b):
        for i, n in enumerate(lens):
            start = sum(lens[:i])
            assert (x[i, :n] - y[0, start : start + n]).abs().max().item() < 1e-6


@pytest.mark.parametrize("softcap", [0.0, 4.0])
def test_the_compiled_tiles(monkeypatch, softcap):
    # The tile sizes compile.py compiles (64 x 64 for 64-wide heads), not the interpreter's
    # small ones: ragged sequences across several tiles, GQA, bf16, with and without a cap.
    import host

    monkeypatch.setattr(host, "tiles", lambda d, interpret=False: host.CONFIGS[host.block_d(d)][:2])
    b, t, hq, hkv, d, lengths = 1, 200, 2, 1, 64, [70, 129, 1]
    q, k, v, do = make(b, t, hq, hkv, d, "bthd", torch.bfloat16, 3.0 if softcap else 1.0)
    cu = offsets(b, t, lengths).to(DEVICE)
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    o = flash_attention(q, k, v, cu, "bthd", 0, d ** -0.5, softcap, INTERPRET)
    got = (o, *torch.autograd.grad(o, (q, k, v), do))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference(q64, k64, v64, cu.cpu(), "bthd", 0, d ** -0.5, softcap)
    want = (ref, *torch.autograd.grad(ref, (q64, k64, v64), do.double()))
    errors = [rel(a, b) for a, b in zip(got, want)]
    assert max(errors) < 2e-2, errors


@pytest.mark.parametrize("tiles", [(16, 32), (32, 16)])
@pytest.mark.parametrize("name", ["window_across_tiles", "gqa_packed", "softcap_window_packed"])
def test_unequal_query_and_key_tiles(monkeypatch, tiles, name):
    # Query tiles taller or shorter than key tiles (what `device_check.py --tune` may pick): the
    # ranges seen whole, the diagonal's and the window's edges still fall on the right tiles.
    import host

    monkeypatch.setattr(host, "tiles", lambda d, interpret=False: tiles)
    b, t, hq, hkv, d, lengths, window, softcap, layout = CASES[name]
    q, k, v, do = make(b, t, hq, hkv, d, layout, torch.float32, 3.0 if softcap else 1.0)
    cu = offsets(b, t, lengths).to(DEVICE)
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    o = flash_attention(q, k, v, cu, layout, window, d ** -0.5, softcap, INTERPRET)
    got = (o, *torch.autograd.grad(o, (q, k, v), do))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference(q64, k64, v64, cu.cpu(), layout, window, d ** -0.5, softcap)
    want = (ref, *torch.autograd.grad(ref, (q64, k64, v64), do.double()))
    errors = [rel(a, b) for a, b in zip(got, want)]
    assert max(errors) < 3e-6, errors


SHARED = {
    # name: (Hq, Hkv, D, keys per sequence, queries per sequence (its last), window, softcap, layout)
    "shared_prompts": (4, 2, 16, [30, 25, 40, 1], [30, 12, 1, 1], 0, 0.0, "bthd"),
    "shared_window_cap": (2, 1, 16, [41, 37], [41, 20], 9, 3.0, "bhtd"),
    "shared_across_tiles": (2, 2, 16, [70, 66], [70, 30], 0, 0.0, "bthd"),
}


def query_rows(lens, queries):
    """The positions of each sequence's queries (its last ones) on the keys' flat axis."""
    rows, start = [], 0
    for n, m in zip(lens, queries):
        rows += list(range(start + n - m, start + n))
        start += n
    return torch.tensor(rows)


def shared_case(name, dtype, tiles=None, monkeypatch=None):
    """The kernels with fewer queries than keys (`cu_q`) against the reference over whole
    sequences whose other positions have no gradient: the same outputs and every gradient."""
    if tiles is not None:
        import host

        monkeypatch.setattr(host, "tiles", lambda d, interpret=False: tiles)
    hq, hkv, d, lens, queries, window, softcap, layout = SHARED[name]
    t = sum(lens)
    q, k, v, do = make(1, t, hq, hkv, d, layout, dtype, 3.0 if softcap else 1.0)
    rows = query_rows(lens, queries).to(DEVICE)
    axis = 1 if layout == "bthd" else 2
    own = lambda x: x.index_select(axis, rows)  # noqa: E731
    cu = offsets(1, t, lens).to(DEVICE)
    cu_q = offsets(1, sum(queries), queries).to(DEVICE)
    qo, do_o = own(q).clone().requires_grad_(), own(do)
    k, v = k.clone().requires_grad_(), v.clone().requires_grad_()
    o = flash_attention(qo, k, v, cu, layout, window, d ** -0.5, softcap, INTERPRET, cu_q=cu_q)
    got = (o, *torch.autograd.grad(o, (qo, k, v), do_o))
    # the reference: every position a query, the others' output gradient zero
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference(q64, k64, v64, cu.cpu(), layout, window, d ** -0.5, softcap)
    do64 = torch.zeros_like(ref).index_copy(axis, rows.cpu(), do_o.double().cpu())
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), do64)
    want = (own(ref), own(rq), rk, rv)
    return [rel(a, b) for a, b in zip(got, want)]


@pytest.mark.parametrize("name", sorted(SHARED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_queries_fewer_than_keys_equal_the_whole_sequences(name, dtype):
    errors = shared_case(name, dtype)
    assert max(errors) < (3e-6 if dtype == torch.float32 else 2e-2), (name, errors)


@pytest.mark.parametrize("tiles", [(16, 32), (32, 16), (64, 64)])
def test_queries_fewer_than_keys_in_other_tiles(monkeypatch, tiles):
    # the first query inside a tile, on its edge, past several tiles: 30, 25 and 40 positions
    for name in SHARED:
        errors = shared_case(name, torch.float32, tiles, monkeypatch)
        assert max(errors) < 3e-6, (name, tiles, errors)

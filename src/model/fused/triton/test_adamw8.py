"""The 8-bit AdamW kernel's own source (adamw8.py) on CPU tensors under Triton's interpreter, in
the launch sequence refdpo makes (grad_sumsq and clip_norm over every chunk, adamw_multi over
the dense tensors' chunks, adamw8_multi over the 8-bit ones'):

- against bitsandbytes' AdamW8bit (tests/fixtures/adamw8bit/bnb.json, its CPU update with its
  reference quantizer): 4 steps of one [32, 160] tensor with weight decay give the same codes,
  and weights within 1.2e-7, as refdpo's CPU loops do (src/train/optim.rs);
- against refdpo's CPU loops (src/train/adamw8.rs), emulated one IEEE float32 op at a time in
  numpy: the same weights, codes and absmax, bit for bit, over steps that clip and steps that
  do not, a chunk boundary, a short last block, an all-zero block, and a dense tensor beside
  (whose update stays adamw.py's, bit for bit with the composed ops);
- bf16 weights take the f32 update rounded stochastically; a non-finite norm changes nothing.

    TRITON_INTERPRET=1 python -m pytest src/model/fused/triton -q
"""

import functools
import json
import math
import os

import numpy as np
import torch

import adamw
import adamw8
from adamw import CHUNK
from test_adamw import DEVICE, composed_step, f32, norm_and_coef, scalars, update

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "..", "..", "..", "tests", "fixtures", "adamw8bit",
                       "bnb.json")


@functools.lru_cache(maxsize=None)
def maps():
    """The two maps from the fixture (bitsandbytes' create_dynamic_map), and their midpoints
    padded with +inf, as refdpo's Map holds them: MAPS, BOUNDS [2, 256] f32."""
    with open(FIXTURE) as f:
        fx = json.load(f)
    values = [np.array(fx["maps"][k], dtype=np.float32) for k in ("signed", "unsigned")]
    bounds = [np.append((v[:-1] + v[1:]) / np.float32(2), np.float32(np.inf)).astype(np.float32) for v in values]
    return fx, values, bounds


class Eight:
    """One tensor with 8-bit moments: weights, codes, absmax (zeros: a fresh optimizer)."""

    def __init__(self, w, decays=True, seed=0):
        n = w.numel()
        self.w = w.to(DEVICE)
        self.mc = torch.zeros(n, dtype=torch.uint8, device=DEVICE)
        self.vc = torch.zeros(n, dtype=torch.uint8, device=DEVICE)
        blocks = -(-n // adamw8.QBLOCK)
        self.ma = torch.zeros(blocks, device=DEVICE)
        self.va = torch.zeros(blocks, device=DEVICE)
        self.decays, self.seed = decays, seed


def launch_any(kernel, grid, args, consts):
    """Triton's JIT (or interpreter) launch of either module's kernel."""
    module = adamw8 if kernel == "adamw8_multi" else adamw
    getattr(module, kernel)[grid](*args, **consts)


def tables(dense, eight, gs_dense, gs_eight):
    """PTRS and CHUNKS as refdpo's launcher makes them: one table, the dense tensors' rows and
    chunks first. Returns (ptrs, chunks, the dense tensors' chunk count)."""
    ptrs, chunks = [], []
    rows = [(x.w, x.m, x.v, g, x.decays, (0, 0, 0)) for x, g in zip(dense, gs_dense)]
    rows += [(x.w, x.mc, x.vc, g, x.decays, (x.ma, x.va, x.seed)) for x, g in zip(eight, gs_eight)]
    n_dense = 0
    for t, (w, a, b, g, d, extra) in enumerate(rows):
        words = [w.data_ptr(), a.data_ptr(), b.data_ptr(), g.data_ptr()]
        words += [x if isinstance(x, int) else x.data_ptr() for x in extra]
        ptrs += words
        n = w.numel()
        chunks += [x for start in range(0, n, CHUNK) for x in (t, start, min(n, start + CHUNK), int(d))]
        if t < len(dense):
            n_dense = len(chunks) // 4
    ptrs = torch.tensor(ptrs, dtype=torch.int64, device=DEVICE)
    chunks = torch.tensor(chunks, dtype=torch.int32, device=DEVICE)
    return ptrs, chunks, n_dense


@functools.lru_cache(maxsize=None)
def device_maps():
    """MAPS and BOUNDS [2, 256] f32 on DEVICE."""
    _, values, bounds = maps()
    return tuple(torch.from_numpy(np.stack(x)).to(DEVICE) for x in (values, bounds))


def launch_step(ptrs, chunks, n_dense, s, max_norm, bf16=False, w_bf16=False, launch=launch_any):
    """The step's launches over [`tables`]' tables: the norm and clipping over every chunk, the
    dense update over the first n_dense, the 8-bit one over the rest (none when there are
    none, as refdpo's launcher skips it). Returns OUT, [norm, coefficient] on DEVICE."""
    n_chunks = chunks.numel() // 4
    out = norm_and_coef(ptrs, chunks, n_chunks, bf16, max_norm, launch=launch)
    if n_dense:
        update(ptrs, chunks, n_dense, out, s, bf16, launch=launch, w_bf16=w_bf16)
    if n_chunks > n_dense:
        m, b = device_maps()
        args = (ptrs, chunks[n_dense * 4:], out, m, b, s["beta1"], s["omb1"], s["beta2"], s["omb2"], s["decay"],
                s["lr_bc1"], s["inv_sqrt_bc2"], s["eps"])
        consts = dict(BF16=bf16, W_BF16=w_bf16, CHUNK=CHUNK, QBLOCK=adamw8.QBLOCK, ROWS=adamw8.ROWS)
        launch("adamw8_multi", (n_chunks - n_dense,), args, consts)
    return out


def step(dense, eight, gs_dense, gs_eight, s, max_norm, bf16=False, w_bf16=False, launch=launch_any):
    """One step as refdpo's launcher makes it. Returns [norm, coefficient]."""
    out = launch_step(*tables(dense, eight, gs_dense, gs_eight), s, max_norm, bf16, w_bf16, launch)
    return out.cpu().tolist()


def cpu_loops(w, mc, ma, vc, va, g, s, coef, decays):
    """src/train/adamw8.rs's `block` and `store`, one IEEE float32 op at a time (numpy: no
    fused multiply-add), on numpy arrays; returns (w, mc, ma, vc, va)."""
    _, (map_m, map_v), (bounds_m, bounds_v) = maps()
    c = {k: np.float32(x) for k, x in s.items()}
    decay = c["decay"] if decays else np.float32(1)
    n, q = w.size, adamw8.QBLOCK
    w, mc, vc = w.copy(), mc.copy(), vc.copy()
    ma, va = ma.copy(), va.copy()
    for b in range(-(-n // q)):
        sl = slice(b * q, min(n, (b + 1) * q))
        gb = g[sl] * np.float32(coef)
        m = map_m[mc[sl]] * ma[b] * c["beta1"] + gb * c["omb1"]
        v = map_v[vc[sl]] * va[b] * c["beta2"] + gb * gb * c["omb2"]
        denom = np.sqrt(v) * c["inv_sqrt_bc2"] + c["eps"]
        w[sl] = w[sl] * decay - m / denom * c["lr_bc1"]
        for x, codes, absmax, bounds in ((m, mc, ma, bounds_m), (v, vc, va, bounds_v)):
            top = np.max(np.abs(x))
            inv = np.float32(1) / max(top, np.float32(1e-38))
            scaled = np.clip(x * inv, np.float32(-1), np.float32(1))
            codes[sl] = np.searchsorted(bounds[:255], scaled, side="left").astype(np.uint8)
            absmax[b] = top
        assert w.dtype == m.dtype == v.dtype == np.float32
    return w, mc, ma, vc, va


def test_follows_bitsandbytes_adamw8bit(launch=None):
    launch = launch or launch_any
    fx, _, _ = maps()
    a = fx["adamw"]
    n = a["shape"][0] * a["shape"][1]
    i = torch.arange(n, dtype=torch.int64)

    def ramp(mult, add):
        return ((i * mult + add) % 2001 - 1000).to(torch.float32) / 1000.0

    scales = torch.tensor(a["scales"], dtype=torch.float32)[(i // 256) % len(a["scales"])]
    x = Eight(ramp(389, 17))
    for t in range(1, 5):
        g = (ramp(7919, 104729 * t) * scales).to(DEVICE)
        s = scalars(a["lr"], *a["betas"], a["eps"], a["weight_decay"], t)
        step([], [x], [], [g], s, 0.0, launch=launch)
        if t == 1:
            d = (x.w.cpu() - torch.tensor(a["weights_after"][0])).abs().max().item()
            assert d <= 1.2e-7, f"step 1: {d} from bitsandbytes"
    ref = fx["reference"]
    d = (x.w.cpu() - torch.tensor(ref["weights_after"])).abs().max().item()
    assert d <= 1.2e-7, f"step 4: {d} from bitsandbytes' reference"
    for codes, key in ((x.mc, "m"), (x.vc, "v")):
        assert codes.cpu().tolist() == ref[f"{key}_codes"], f"{key} codes differ from bitsandbytes' reference"


def test_equals_the_cpu_loops_beside_a_dense_tensor(launch=None):
    launch = launch or launch_any
    torch.manual_seed(0)
    n8 = CHUNK + 1000 + 77  # two chunks, the last block short
    w8 = torch.randn(n8)
    eight = [Eight(w8.clone(), decays=True), Eight(torch.randn(300), decays=False)]
    mirror = [[x.w.cpu().numpy().copy(), np.zeros(x.w.numel(), np.uint8), np.zeros_like(x.ma.cpu().numpy()),
               np.zeros(x.w.numel(), np.uint8), np.zeros_like(x.va.cpu().numpy())] for x in eight]

    class Dense:
        def __init__(self, w):
            self.w, self.decays = w.to(DEVICE), True
            self.m, self.v = torch.zeros_like(self.w), torch.zeros_like(self.w)

    dense = [Dense(torch.randn(5000))]
    dense_mirror = [dense[0].w.clone(), dense[0].m.clone(), dense[0].v.clone()]
    lr, betas, eps, wd = 1e-3, (0.9, 0.999), 1e-8, 0.01
    for t in range(1, 5):
        gs8 = [torch.randn(x.w.numel()).to(torch.bfloat16).float() for x in eight]
        gs8[0][2 * 256: 3 * 256] = 0.0  # an all-zero block (its m stays zero after step 1)
        gd = [torch.randn(5000)]
        max_norm = 100.0 if t == 3 else 1000.0  # step 3 clips
        s = scalars(lr, *betas, eps, wd, t)
        norm, coef = step(dense, eight, [g.to(DEVICE) for g in gd], [g.to(DEVICE) for g in gs8], s, max_norm,
                          launch=launch)
        exact = math.sqrt(sum((g.double() ** 2).sum().item() for g in gs8 + gd))
        assert abs(norm - exact) <= 1e-6 * exact
        assert (coef < 1) == (t == 3), coef
        for x, mir, g in zip(eight, mirror, gs8):
            w, mc, ma, vc, va = mir
            mir[:] = cpu_loops(w, mc, ma, vc, va, g.numpy(), s, f32(coef), x.decays)
            for got, want, what in zip((x.w, x.mc, x.ma, x.vc, x.va), mir, ("w", "m codes", "m absmax", "v codes",
                                                                           "v absmax")):
                assert np.array_equal(got.cpu().numpy(), want), f"step {t}: {what} differs from the CPU loops"
        dense_mirror = list(composed_step(*dense_mirror, gd[0], s, f32(coef), True))
        for a, b in zip((dense[0].w, dense[0].m, dense[0].v), dense_mirror):
            assert torch.equal(a.cpu(), b), f"step {t}: the dense tensor differs from the composed ops"
    assert torch.isfinite(eight[0].ma).all() and torch.isfinite(eight[0].w).all()


def test_bf16_weights_round_stochastically_and_a_non_finite_norm_changes_nothing(launch=None):
    launch = launch or launch_any
    n = 1 << 14
    spacing = 2.0**-7
    lr = 1e-4  # the first step moves each weight by lr: 1/78 of a spacing
    x = Eight(torch.ones(n, dtype=torch.bfloat16), decays=False, seed=4321)
    g = -torch.ones(n, dtype=torch.bfloat16, device=DEVICE)
    step([], [x], [], [g], scalars(lr, 0.9, 0.999, 1e-8, 0.0, 1), 0.0, bf16=True, w_bf16=True, launch=launch)
    got = x.w.float().cpu()
    assert torch.all((got == 1.0) | (got == 1.0 + spacing)), "rounded to a non-neighbour"
    up = (got > 1.0).double().mean().item()
    # binomial over 16,384 draws: 4 standard deviations at p = 1/78 is 0.0035
    assert abs(up - lr / spacing) < 0.0035, up
    # the first moment is -0.1 everywhere: code of -1 (the signed map's first entry), absmax 0.1
    assert torch.all(x.mc.cpu() == 0) and torch.allclose(x.ma.cpu(), torch.tensor(0.1))
    for bad in (float("inf"), float("nan")):
        before = [t.clone() for t in (x.w, x.mc, x.ma, x.vc, x.va)]
        g_bad = torch.ones(n, device=DEVICE)
        g_bad[777] = bad
        norm, coef = step([], [x], [], [g_bad], scalars(lr, 0.9, 0.999, 1e-8, 0.0, 2), 1.0, w_bf16=True,
                          launch=launch)
        assert not math.isfinite(norm) and math.isnan(coef)
        for a, b in zip((x.w, x.mc, x.ma, x.vc, x.va), before):
            assert torch.equal(a, b), f"a {bad} gradient changed the state"

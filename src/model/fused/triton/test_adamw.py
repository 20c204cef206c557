"""The optimizer kernels' own source (adamw.py) on CPU tensors under Triton's interpreter:

- f32 state equals the composed ops bit for bit (candle's op order, emulated here one IEEE
  float32 op at a time in numpy) and torch.optim.AdamW after torch's clip_grad_norm_ (an
  independent implementation) within f32 rounding, over several steps and several tensors at
  once (chunks cut inside a tensor, a ragged end, a tensor without weight decay, steps that
  clip and steps that do not, bf16 gradients rounded from f32);
- the gradient norm equals the f64 sum within 1e-6 (torch's clip_grad_norm_ within 1e-5), and a non-finite norm leaves
  every weight and moment as it was;
- a bf16 moment is rounded stochastically: always to one of the two neighbouring bf16 values,
  up with probability equal to the distance, exact values kept;
- bf16 weights (`train.master_dtype = "bf16"`) take the f32 update rounded the same way: an
  update far below half a bf16 spacing, which round-to-nearest drops, moves them on average.

    TRITON_INTERPRET=1 python -m pytest src/model/fused/triton -q
"""

import math
import os

import numpy as np
import torch
import triton

import adamw
from adamw import CHUNK

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"


def f32(x):
    return torch.tensor(x, dtype=torch.float64).float().item()


def scalars(lr, beta1, beta2, eps, wd, step):
    """The f64 host scalars, rounded to f32 as the composed ops and the launcher pass them."""
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    return dict(
        beta1=f32(beta1), omb1=f32(1 - beta1), beta2=f32(beta2), omb2=f32(1 - beta2),
        decay=f32(1 - lr * wd), lr_bc1=f32(lr / bc1), inv_sqrt_bc2=f32(1 / math.sqrt(bc2)), eps=f32(eps),
    )


def jit(kernel, grid, args, consts):
    getattr(adamw, kernel)[grid](*args, **consts)


def tables(ws, ms, vs, gs, decays, seeds):
    """PTRS [tensors, 7] int64 and CHUNKS [chunks, 4] int32, as refdpo's launcher makes them;
    seeds: (m, v) or (m, v, w) per tensor."""
    ptrs, chunks = [], []
    for t, (w, m, v, g, d, sd) in enumerate(zip(ws, ms, vs, gs, decays, seeds)):
        sm, sv, sw = (*sd, 0)[:3]
        ptrs += [w.data_ptr(), m.data_ptr(), v.data_ptr(), g.data_ptr(), sm, sv, sw]
        assert len(ptrs) == (t + 1) * adamw.PTR_WORDS
        n = w.numel()
        chunks += [x for start in range(0, n, CHUNK) for x in (t, start, min(n, start + CHUNK), int(d))]
    ptrs = torch.tensor(ptrs, dtype=torch.int64, device=DEVICE)
    chunks = torch.tensor(chunks, dtype=torch.int32, device=DEVICE)
    return ptrs, chunks, chunks.numel() // 4


def norm_and_coef(ptrs, chunks, n_chunks, bf16, max_norm, launch=jit):
    """The first two launches: OUT = [norm, coefficient], f64."""
    partials = torch.zeros(n_chunks, dtype=torch.float32, device=DEVICE)
    out = torch.zeros(2, dtype=torch.float64, device=DEVICE)
    launch("grad_sumsq", (n_chunks,), (ptrs, chunks, partials), dict(BF16=bf16, CHUNK=CHUNK, BLOCK=adamw.BLOCK))
    launch("clip_norm", (1,), (partials, n_chunks, out, float(max_norm)), dict(BLOCK=adamw.BLOCK))
    return out


def update(ptrs, chunks, n_chunks, out, s, bf16, launch=jit, w_bf16=False):
    """The third launch: AdamW on every chunk, scaled by OUT's coefficient."""
    args = (ptrs, chunks, out, s["beta1"], s["omb1"], s["beta2"], s["omb2"], s["decay"], s["lr_bc1"],
            s["inv_sqrt_bc2"], s["eps"])
    launch("adamw_multi", (n_chunks,), args, dict(BF16=bf16, W_BF16=w_bf16, CHUNK=CHUNK, BLOCK=adamw.BLOCK))


def composed_step(w, m, v, g, s, coef, decays):
    """src/train/optim.rs's composed ops, in their order, one IEEE float32 op at a time (numpy:
    no fused multiply-add; candle's affine is x * a + b)."""
    c = {k: np.float32(x) for k, x in s.items()}
    decay = c["decay"] if decays else np.float32(1)
    w, m, v = (x.numpy() for x in (w, m, v))
    g = g.float().numpy() * np.float32(coef) + np.float32(0)
    m = (m * c["beta1"] + np.float32(0)) + (g * c["omb1"] + np.float32(0))
    v = (v * c["beta2"] + np.float32(0)) + ((g * g) * c["omb2"] + np.float32(0))
    denom = (np.sqrt(v) * c["inv_sqrt_bc2"] + np.float32(0)) * np.float32(1) + c["eps"]
    w = (w * decay + np.float32(0)) - ((m / denom) * c["lr_bc1"] + np.float32(0))
    assert w.dtype == m.dtype == v.dtype == np.float32
    return tuple(torch.from_numpy(x) for x in (w, m, v))


def test_f32_state_equals_the_composed_ops_and_torch_adamw(launch=jit):
    torch.manual_seed(0)
    # two chunks with a ragged end, a ragged single chunk, one element; the last without decay
    sizes, decays = (CHUNK + 3000, 3000, 1), (True, True, False)
    lr, betas, eps, wd = 1e-3, (0.9, 0.999), 1e-8, 0.01
    w0 = [torch.randn(n) for n in sizes]
    fused = [[w.clone().to(DEVICE), torch.zeros_like(w, device=DEVICE), torch.zeros_like(w, device=DEVICE)]
             for w in w0]
    comp = [[w.clone(), torch.zeros_like(w), torch.zeros_like(w)] for w in w0]
    ref = [torch.nn.Parameter(w.clone()) for w in w0]
    opt = torch.optim.AdamW(
        [{"params": ref[:2], "weight_decay": wd}, {"params": ref[2:], "weight_decay": 0.0}],
        lr=lr, betas=betas, eps=eps,
    )
    for step in range(1, 6):
        # gradients kept in f32, rounded through bf16 as a bf16 model's are
        gs = [torch.randn(n).to(torch.bfloat16).float() for n in sizes]
        max_norm = 1000.0 if step != 3 else 100.0  # step 3 clips (the norm is about 267)
        g_dev = [g.to(DEVICE) for g in gs]
        ptrs, chunks, n_chunks = tables(*zip(*fused), g_dev, decays, [(0, 0)] * 3)
        out = norm_and_coef(ptrs, chunks, n_chunks, False, max_norm, launch=launch)
        s = scalars(lr, *betas, eps, wd, step)
        update(ptrs, chunks, n_chunks, out, s, False, launch=launch)
        norm, coef = out.cpu().tolist()

        for r, g in zip(ref, gs):
            r.grad = g.clone()
        torch_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm, foreach=False).item()
        exact = math.sqrt(sum((g.double() ** 2).sum().item() for g in gs))
        # torch's f32 reduction is the less exact of the two (2.4e-6 from the f64 sum here)
        assert abs(norm - exact) <= 1e-6 * exact, f"step {step}: norm {norm}, in f64 {exact}"
        assert abs(norm - torch_norm) <= 1e-5 * torch_norm, f"step {step}: norm {norm}, torch's {torch_norm}"
        assert (coef < 1) == (step == 3), f"step {step}: coefficient {coef}"
        if step == 3:
            assert abs(coef - max_norm / (exact + 1e-6)) < 1e-6 * coef
        opt.step()

        comp = [list(composed_step(*c, g, s, f32(coef), d)) for c, g, d in zip(comp, gs, decays)]
        for t, (f, c, r) in enumerate(zip(fused, comp, ref)):
            for a, b, what in zip(f, c, "wmv"):
                assert torch.equal(a.cpu(), b), f"step {step}, tensor {t}: {what} differs from the composed ops"
            rel = ((f[0].cpu() - r.detach()).abs().max() / r.detach().abs().max()).item()
            assert rel < 1e-6, f"step {step}, tensor {t}: {rel} from torch.optim.AdamW"


def test_a_non_finite_norm_changes_nothing(launch=jit):
    for bad in (float("inf"), float("nan")):
        w = torch.randn(5000, device=DEVICE)
        m, v = torch.full_like(w, 0.5), torch.full_like(w, 0.25)
        g = torch.randn(5000, device=DEVICE)
        g[4321] = bad
        before = [x.clone() for x in (w, m, v)]
        ptrs, chunks, n_chunks = tables([w], [m], [v], [g], [True], [(0, 0)])
        out = norm_and_coef(ptrs, chunks, n_chunks, False, 1.0, launch=launch)
        update(ptrs, chunks, n_chunks, out, scalars(1e-3, 0.9, 0.999, 1e-8, 0.01, 1), False, launch=launch)
        norm, coef = out.cpu().tolist()
        assert not math.isfinite(norm) and math.isnan(coef), (bad, norm, coef)
        for a, b in zip((w, m, v), before):
            assert torch.equal(a, b), f"a {bad} gradient changed the state"


def test_no_clipping_without_max_norm():
    g = torch.full((100,), 3.0, device=DEVICE)
    ptrs, chunks, n = tables([g], [g], [g], [g], [True], [(0, 0)])
    out = norm_and_coef(ptrs, chunks, n, False, 0.0).cpu().tolist()
    assert out == [30.0, 1.0], out


def test_bf16_moments_round_stochastically():
    n = 1 << 16
    below = 1.0
    spacing = 2.0**-7  # bf16's spacing in [1, 2)
    frac = 0.125

    # beta1 = 0, 1 - beta1 = 1: the moment becomes the gradient, rounded; bf16 gradients cannot
    # hold the value, so it comes in through the coefficient: g = 1 (bf16), coef = the value
    x = below + frac * spacing
    m = torch.zeros(n, dtype=torch.bfloat16, device=DEVICE)
    v = torch.zeros(n, dtype=torch.bfloat16, device=DEVICE)
    w = torch.zeros(n, device=DEVICE)
    ones = torch.ones(n, dtype=torch.bfloat16, device=DEVICE)
    s = dict(beta1=0.0, omb1=1.0, beta2=0.0, omb2=1.0, decay=1.0, lr_bc1=0.0, inv_sqrt_bc2=1.0, eps=1.0)

    def run(seed, value):
        m.zero_()
        ptrs, chunks, nc = tables([w], [m], [v], [ones], [False], [(seed, seed + 1)])
        out = torch.tensor([0.0, value], dtype=torch.float64, device=DEVICE)
        update(ptrs, chunks, nc, out, s, True)
        return m.float().cpu()

    exact = run(1234, 1.5)
    assert torch.all(exact == 1.5), "an exact value was rounded"
    out = run(1234, x)
    assert torch.all((out == below) | (out == below + spacing)), "rounded to a non-neighbour"
    up = (out == below + spacing).double().mean().item()
    # binomial: 4 standard deviations of the fraction over 65,536 draws is 0.0052
    assert abs(up - frac) < 0.0052, up
    # another seed draws other bits
    assert not torch.equal(run(99, x), out)


def test_bf16_weights_round_stochastically(launch=jit):
    """A DPO-sized update on bf16 weights: each lands on one of the two bf16 neighbours of the f32
    result, up with probability equal to the distance, so the mean moves by the update; round-to-
    nearest would leave every weight where it was. The moments are those of f32 state, exactly."""
    n = 1 << 16
    spacing = 2.0**-7  # bf16's spacing in [1, 2)
    lr = 1e-4  # the first step moves each weight by lr (m / sqrt(v) = sign(g)), 1/78 of a spacing
    w = torch.ones(n, dtype=torch.bfloat16, device=DEVICE)
    m, v = torch.zeros(n, device=DEVICE), torch.zeros(n, device=DEVICE)
    g = -torch.ones(n, device=DEVICE)  # the weights go up: 1 + lr
    ptrs, chunks, nc = tables([w], [m], [v], [g], [False], [(0, 0, 4321)])
    out = norm_and_coef(ptrs, chunks, nc, False, 0.0, launch=launch)
    update(ptrs, chunks, nc, out, scalars(lr, 0.9, 0.999, 1e-8, 0.0, 1), False, launch=launch, w_bf16=True)
    got = w.float().cpu()
    assert torch.all((got == 1.0) | (got == 1.0 + spacing)), "rounded to a non-neighbour"
    up = (got > 1.0).double().mean().item()
    frac = lr / spacing  # lr_bc1 * m / (sqrt(v) * inv_sqrt_bc2 + eps) = lr at the first step
    # binomial over 65,536 draws: 4 standard deviations at p = 1/78 is 0.0018
    assert abs(up - frac) < 0.0018, (up, frac)
    assert torch.equal(m.cpu(), torch.full((n,), -0.1)), "the first moment is f32 state's"
    # round-to-nearest would not have moved a single weight
    assert torch.all(torch.tensor(1.0 + lr).to(torch.bfloat16) == 1.0)

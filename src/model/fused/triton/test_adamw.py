"""The AdamW kernels' own source (adamw.py) on CPU tensors under Triton's interpreter:

- f32 state equals the composed ops bit for bit (candle's op order, emulated here one IEEE
  float32 op at a time in numpy) and torch.optim.AdamW (an independent implementation) within f32 rounding, over
  several steps with weight decay, clipping's gradient scale and bf16 gradients;
- a bf16 moment is rounded stochastically: always to one of the two neighbouring bf16 values,
  up with probability equal to the distance, exact values kept.

    TRITON_INTERPRET=1 python -m pytest src/model/fused/triton -q
"""

import math
import os

import numpy as np
import torch
import triton

import adamw
from adamw import adamw_moment

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
BLOCK = 1024


def f32(x):
    return torch.tensor(x, dtype=torch.float64).float().item()


def scalars(lr, beta1, beta2, eps, wd, step, grad_scale):
    """The f64 host scalars, rounded to f32 as the composed ops and the launcher pass them."""
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    return dict(
        beta1=f32(beta1), omb1=f32(1 - beta1), beta2=f32(beta2), omb2=f32(1 - beta2),
        gs=f32(grad_scale), decay=f32(1 - lr * wd), lr_bc1=f32(lr / bc1),
        inv_sqrt_bc2=f32(1 / math.sqrt(bc2)), eps=f32(eps),
    )


def jit(kernel, grid, args, consts):
    getattr(adamw, kernel)[grid](*args, **consts)


def fused_step(w, m, v, g, s, seed=0, launch=jit):
    """One AdamW step in three launches, as refdpo's launcher makes them (or through `launch`,
    e.g. the committed cubins on a GPU)."""
    n = w.numel()
    grid = (triton.cdiv(n, BLOCK),)
    stochastic = m.dtype == torch.bfloat16
    for x, beta, omb, square in ((m, s["beta1"], s["omb1"], False), (v, s["beta2"], s["omb2"], True)):
        consts = dict(SQUARE=square, STOCHASTIC=stochastic, BLOCK=BLOCK)
        launch("adamw_moment", grid, (x, g, n, beta, omb, s["gs"], seed), consts)
    args = (w, m, v, n, s["decay"], s["lr_bc1"], s["inv_sqrt_bc2"], s["eps"])
    launch("adamw_weight", grid, args, dict(BLOCK=BLOCK))


def composed_step(w, m, v, g, s):
    """src/train/optim.rs's composed ops, in their order, one IEEE float32 op at a time (numpy:
    no fused multiply-add; candle's affine is x * a + b)."""
    c = {k: np.float32(x) for k, x in s.items()}
    w, m, v = (x.numpy() for x in (w, m, v))
    g = g.float().numpy() * c["gs"] + np.float32(0)
    m = (m * c["beta1"] + np.float32(0)) + (g * c["omb1"] + np.float32(0))
    v = (v * c["beta2"] + np.float32(0)) + ((g * g) * c["omb2"] + np.float32(0))
    denom = (np.sqrt(v) * c["inv_sqrt_bc2"] + np.float32(0)) * np.float32(1) + c["eps"]
    w = (w * c["decay"] + np.float32(0)) - ((m / denom) * c["lr_bc1"] + np.float32(0))
    assert w.dtype == m.dtype == v.dtype == np.float32
    return tuple(torch.from_numpy(x) for x in (w, m, v))


def test_f32_state_equals_the_composed_ops_and_torch_adamw(launch=jit):
    torch.manual_seed(0)
    n = 3000  # three blocks, the last ragged
    lr, betas, eps, wd = 1e-3, (0.9, 0.999), 1e-8, 0.01
    w0 = torch.randn(n)
    fused = [w0.clone().to(DEVICE), torch.zeros(n, device=DEVICE), torch.zeros(n, device=DEVICE)]
    comp = [w0.clone(), torch.zeros(n), torch.zeros(n)]
    ref = torch.nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([ref], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    for step in range(1, 6):
        grad_scale = 0.5 if step == 3 else 1.0  # a clipped step
        g = torch.randn(n).to(torch.bfloat16)  # gradients kept in bf16
        s = scalars(lr, *betas, eps, wd, step, grad_scale)
        fused_step(*fused, g.to(DEVICE), s, launch=launch)
        comp = list(composed_step(*comp, g, s))
        ref.grad = g.float() * f32(grad_scale)
        opt.step()
        for a, b, what in zip(fused, comp, "wmv"):
            assert torch.equal(a.cpu(), b), f"step {step}: {what} differs from the composed ops"
        rel = ((fused[0].cpu() - ref.detach()).abs().max() / ref.detach().abs().max()).item()
        assert rel < 1e-6, f"step {step}: {rel} from torch.optim.AdamW"


def test_bf16_moments_round_stochastically():
    n = 1 << 16
    below = 1.0
    spacing = 2.0**-7  # bf16's spacing in [1, 2)
    frac = 0.125
    x = torch.full((n,), below + frac * spacing)  # between two bf16 values, 1/8 of the way up
    x[:64] = 1.5  # exact in bf16: kept
    out = torch.zeros(n, dtype=torch.bfloat16, device=DEVICE)
    grid = (triton.cdiv(n, BLOCK),)
    # beta 0: the moment becomes the gradient, rounded
    adamw_moment[grid](out, x.to(DEVICE), n, 0.0, 1.0, 1.0, 1234, SQUARE=False, STOCHASTIC=True, BLOCK=BLOCK)
    out = out.float().cpu()
    assert torch.all(out[:64] == 1.5)
    rest = out[64:]
    assert torch.all((rest == below) | (rest == below + spacing)), "rounded to a non-neighbour"
    up = (rest == below + spacing).double().mean().item()
    # binomial: 4 standard deviations of the fraction over 65,472 draws is 0.0052
    assert abs(up - frac) < 0.0052, up
    # another seed draws other bits
    again = torch.zeros(n, dtype=torch.bfloat16, device=DEVICE)
    adamw_moment[grid](again, x.to(DEVICE), n, 0.0, 1.0, 1.0, 99, SQUARE=False, STOCHASTIC=True, BLOCK=BLOCK)
    assert not torch.equal(again.float().cpu(), out)

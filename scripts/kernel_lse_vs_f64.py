#!/usr/bin/env python3
"""The GPU log-prob kernel (`logp_lse` in src/model/fused/kernels.cu, run on the CPU by its
emulator) on a real model's logits, against the exact log-sum-exp of the same logits in f64
(BENCHMARKS.md, "Log-probs against an f64 forward").

  python scripts/kernel_lse_vs_f64.py MODEL_DIR CACHE_DIR

For every pair of the cache's test split, the chosen answer's logits from a float64
transformers forward, rounded to f32 and to bf16 (what the kernel reads on the GPU), go through
the kernel at the launch `fused/launch.rs` gives (one block of up to 1,024 threads a row). Per
sequence: the summed log-prob's error and its sign. An error of one sign on every sequence is a
bias: the kernel once summed each thread's exps in f32 and put all of them above.

Needs torch, transformers and a C++ compiler (tests/python/install.sh's venv) and PYTHONPATH=python.
"""
import os
import statistics
import sys

import torch
from transformers import AutoModelForCausalLM

import refdpo

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src/model/fused/emulator"))
from emulator import U32, Emulator  # noqa: E402


def row_threads(cols):
    """`launch.rs::row_threads`."""
    return min(max((-(-cols // 4) + 31) // 32 * 32, 32), 1024)


def main(model_dir, cache):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    emu = Emulator()
    logits = []
    for r in refdpo.load_cache(cache, "test_prefs"):
        ids = torch.tensor([r["prompt_ids"] + r["chosen_ids"]])
        with torch.no_grad():
            lg = model(ids).logits[0, :-1]
        start = len(r["prompt_ids"]) - 1
        logits.append((lg[start:], ids[0, 1:][start:].to(torch.int32).contiguous()))
    for dtype, suffix in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        above, rel = 0, []
        for lg, target in logits:
            z = lg.to(dtype).contiguous()
            n, v = z.shape
            out = torch.full((2, n), float("nan"))
            emu.launch(f"logp_lse_{suffix}", n, row_threads(v), z, target, out, U32(n), U32(v))
            zd = z.double()
            exact = (zd.gather(1, target.long()[:, None])[:, 0] - torch.logsumexp(zd, -1)).sum()
            err = (out[0].double().sum() - exact).item()
            above += err > 0
            rel.append(abs(err) / abs(exact.item()))
        print(f"logp_lse_{suffix}: {len(rel)} sequences, above f64 on {above}, relative error "
              f"median {statistics.median(rel):.1e} max {max(rel):.1e}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])

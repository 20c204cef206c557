#!/usr/bin/env python3
"""A cache's reference log-probs against a float64 transformers forward of the same ids, with
transformers' own f32 forward beside them (BENCHMARKS.md, "Log-probs against an f64 forward").

  python scripts/logps_vs_f64.py MODEL_DIR CACHE_DIR [CACHE_DIR ...]

For every pair of the train and test splits, each side's summed answer log-prob: how far refdpo's
cached value is from the f64 one (relative), and on which side; beside it transformers' f32
forward with the log-sum-exp taken as TRL's `selective_log_softmax` takes it on f32 logits
(`torch.logsumexp` in f32) and in f64. An error of one sign on every sequence is a bias, not
rounding: the CPU log-sum-exp once summed a vocabulary in f32 lanes and put all 60 sequences of
the real SmolLM2-135M above f64.

Needs torch and transformers (tests/python/install.sh's venv) and PYTHONPATH=python.
"""
import statistics
import sys

import torch
from transformers import AutoModelForCausalLM

import refdpo


def side_logps(model, row, side):
    """The answer's summed log-prob: (log-sum-exp in the logits' dtype, log-sum-exp in f64)."""
    ids = torch.tensor([row["prompt_ids"] + row[f"{side}_ids"]])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    picked = logits.gather(1, ids[0, 1:, None])[:, 0]
    start = len(row["prompt_ids"]) - 1
    own = (picked - torch.logsumexp(logits, -1)).double()[start:].sum().item()
    wide = (picked.double() - torch.logsumexp(logits.double(), -1))[start:].sum().item()
    return own, wide


def main(model_dir, caches):
    m32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    m64 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    names = ("refdpo", "transformers f32, log-sum-exp in f32 (as TRL)", "transformers f32, log-sum-exp in f64")
    for cache in caches:
        rows = []
        for split in ("train_prefs", "test_prefs"):
            for r in refdpo.load_cache(cache, split):
                for side in ("chosen", "rejected"):
                    exact = side_logps(m64, r, side)[0]
                    own, wide = side_logps(m32, r, side)
                    rows.append((r[f"ref_{side}_logps"] - exact, own - exact, wide - exact, abs(exact)))
        for k, name in enumerate(names):
            rel = [abs(x[k]) / x[3] for x in rows]
            above = sum(x[k] > 0 for x in rows)
            print(
                f"{cache}: {name}: {len(rows)} sequences, above f64 on {above}, relative error "
                f"median {statistics.median(rel):.1e} max {max(rel):.1e}",
                flush=True,
            )


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])

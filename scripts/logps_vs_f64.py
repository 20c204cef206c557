#!/usr/bin/env python3
"""A cache's reference log-probs against a float64 transformers forward of the same ids, with
transformers' own f32 forward beside them (README, "Why the decoder is refdpo's own").

  python scripts/logps_vs_f64.py MODEL_DIR CACHE_DIR [CACHE_DIR ...]

For every pair of the train and test splits, each side's summed answer log-prob: how far refdpo's
cached value and transformers' f32 value are from the f64 one (relative), and on which side. An
error of one sign on every sequence is a bias, not rounding: the CPU log-sum-exp once summed a
vocabulary in f32 lanes and put all 60 sequences of the real SmolLM2-135M above f64.

Needs torch and transformers (tests/python/install.sh's venv) and PYTHONPATH=python.
"""
import statistics
import sys

import torch
from transformers import AutoModelForCausalLM

import refdpo


def side_logp(model, row, side):
    ids = torch.tensor([row["prompt_ids"] + row[f"{side}_ids"]])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    # as TRL: log_softmax in the model's dtype (f32), then the answer tokens' sum
    lp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0].double()
    return lp[len(row["prompt_ids"]) - 1 :].sum().item()


def main(model_dir, caches):
    m32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    m64 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    for cache in caches:
        rows = []
        for split in ("train_prefs", "test_prefs"):
            for r in refdpo.load_cache(cache, split):
                for side in ("chosen", "rejected"):
                    exact = side_logp(m64, r, side)
                    rows.append((r[f"ref_{side}_logps"] - exact, side_logp(m32, r, side) - exact, abs(exact)))
        for name, k in (("refdpo", 0), ("transformers f32", 1)):
            rel = [abs(x[k]) / x[2] for x in rows]
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

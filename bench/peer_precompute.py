"""The peer of `refdpo precompute`: transformers forward + completion log-probs, in f32 on the
CPU, over exactly the token ids refdpo cached (same sequences, same batch composition: longest
first within chunks of --chunk pairs, --batch pairs per forward), timed without loading.
Each sequence's log-probs are taken as TRL's `selective_log_softmax` takes them in f32 (the
target's logit less `torch.logsumexp` over the vocabulary, a sequence at a time, so no batch-wide
f32 copy of the logits), and a batch's sums reach the host at once.

usage: python bench/peer_precompute.py MODEL_DIR CACHE_PARQUET --threads N --batch B[,B...] --chunk C
       [--device cuda --dtype bfloat16]   (the GPU comparison uses the same script)
With several batch sizes (`--batch 8,16,32`) each is timed in turn on the one loaded model, and
the fastest is the result (issue 24: transformers at its best batch).
Prints one JSON object: tokens, seconds, tokens_per_second and batch (of the fastest batch size),
by_batch (each size's tokens/s), max_rel_diff (vs refdpo's ref logps, over every size).
"""
import argparse
import json
import time

import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("cache")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--batch", default="8", help="pairs per forward; a comma-separated list times each")
p.add_argument("--chunk", type=int, default=256)
p.add_argument("--device", default="cpu")
p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
a = p.parse_args()
torch.set_num_threads(a.threads)
dev = torch.device(a.device)

t = pq.read_table(a.cache).to_pylist()
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype), attn_implementation="sdpa").to(dev).eval()


def batches_of(batch):
    out = []
    for c in range(0, len(t), a.chunk):
        chunk = t[c : c + a.chunk]
        order = sorted(range(len(chunk)), key=lambda i: -(2 * len(chunk[i]["prompt_ids"]) + len(chunk[i]["chosen_ids"]) + len(chunk[i]["rejected_ids"])))
        for b in range(0, len(order), batch):
            out.append([chunk[i] for i in order[b : b + batch]])
    return out


def forward(rows):
    """Summed completion log-probs of the chosen then rejected sequences of `rows`."""
    seqs = [r["prompt_ids"] + r["chosen_ids"] for r in rows] + [r["prompt_ids"] + r["rejected_ids"] for r in rows]
    T = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), T), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    targets = ids[:, 1:]
    logp = []
    for row, tgt in zip(logits, targets):
        row = row.float()
        logp.append(row.gather(-1, tgt[:, None]).squeeze(-1) - torch.logsumexp(row, dim=-1))
    logp = torch.stack(logp).double()
    # completion positions: from the last prompt position to the sequence's second to last
    starts = torch.tensor([len(r["prompt_ids"]) - 1 for r in rows] * 2, device=dev)
    ends = torch.tensor([len(s) - 1 for s in seqs], device=dev)
    pos = torch.arange(T - 1, device=dev)
    keep = (pos[None, :] >= starts[:, None]) & (pos[None, :] < ends[:, None])
    return (logp * keep).sum(-1).tolist(), sum(len(s) for s in seqs)


def timed(batches):
    with torch.inference_mode():
        if dev.type == "cuda":
            forward(batches[0])  # warm-up (cuBLAS handles, allocator, this batch size), untimed
            torch.cuda.synchronize()
        tokens, max_rel, start = 0, 0.0, time.perf_counter()
        for rows in batches:
            sums, n_tokens = forward(rows)
            tokens += n_tokens
            n = len(rows)
            for i, r in enumerate(rows):
                for got, want in ((sums[i], r["ref_chosen_logps"]), (sums[n + i], r["ref_rejected_logps"])):
                    max_rel = max(max_rel, abs(got - want) / max(1.0, abs(want)))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return tokens, time.perf_counter() - start, max_rel


runs = {}
for batch in [int(b) for b in a.batch.split(",")]:
    runs[batch] = timed(batches_of(batch))
best = max(runs, key=lambda b: runs[b][0] / runs[b][1])
tokens, seconds, _ = runs[best]
print(json.dumps({"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds, "batch": best,
                  "by_batch": {str(b): r[0] / r[1] for b, r in runs.items()},
                  "max_rel_diff": max(r[2] for r in runs.values())}))

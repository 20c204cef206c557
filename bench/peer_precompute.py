"""The peer of `refdpo precompute`: transformers forward + completion log-probs, in f32 on the
CPU, over exactly the token ids refdpo cached (same sequences, same batch composition: longest
first within chunks of --chunk pairs, --batch pairs per forward), timed without loading.

usage: python bench/peer_precompute.py MODEL_DIR CACHE_PARQUET --threads N --batch B --chunk C
       [--device cuda --dtype bfloat16]   (the GPU comparison uses the same script)
Prints one JSON object: tokens, seconds, tokens_per_second, max_rel_diff (vs refdpo's ref logps).
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
p.add_argument("--batch", type=int, default=8)
p.add_argument("--chunk", type=int, default=256)
p.add_argument("--device", default="cpu")
p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
a = p.parse_args()
torch.set_num_threads(a.threads)
dev = torch.device(a.device)

t = pq.read_table(a.cache).to_pylist()
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype), attn_implementation="sdpa").to(dev).eval()


def seq_len(r):
    return len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"]))


batches = []
for c in range(0, len(t), a.chunk):
    chunk = t[c : c + a.chunk]
    order = sorted(range(len(chunk)), key=lambda i: -(2 * len(chunk[i]["prompt_ids"]) + len(chunk[i]["chosen_ids"]) + len(chunk[i]["rejected_ids"])))
    for b in range(0, len(order), a.batch):
        batches.append([chunk[i] for i in order[b : b + a.batch]])

def forward(rows):
    """Summed completion log-probs of the chosen then rejected sequences of `rows`."""
    seqs = [r["prompt_ids"] + r["chosen_ids"] for r in rows] + [r["prompt_ids"] + r["rejected_ids"] for r in rows]
    starts = [len(r["prompt_ids"]) for r in rows] * 2
    T = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), T), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    sums = [float(logp[i, starts[i] - 1 : len(s) - 1].double().sum()) for i, s in enumerate(seqs)]
    return sums, sum(len(s) for s in seqs)


with torch.inference_mode():
    if dev.type == "cuda":
        forward(batches[0])  # warm-up (cuBLAS handles, allocator), untimed
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
seconds = time.perf_counter() - start
print(json.dumps({"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds, "max_rel_diff": max_rel}))

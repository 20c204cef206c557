"""The peer of `refdpo generate`: transformers' `generate(do_sample=False)` with a KV cache, in f32 on
the CPU, on the prompts refdpo read (the first --limit of the cache split, in batches of --batch,
left-padded as refdpo pads them), timed without loading.

usage: python bench/peer_generate.py MODEL_DIR CACHE_PARQUET REFDPO_JSONL --limit N --batch B
       --max-new-tokens M --threads T
Prints one JSON object: tokens (generated, EOS included, nothing after it), seconds,
tokens_per_second, same_continuations (prompts whose greedy continuation equals refdpo's).
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
p.add_argument("refdpo")
p.add_argument("--limit", type=int, default=16)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--max-new-tokens", type=int, default=64)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
torch.set_num_threads(a.threads)
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="eager").eval()
eos = model.generation_config.eos_token_id
eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
prompts = [r["prompt_ids"] for r in pq.read_table(a.cache).to_pylist()[: a.limit]]
ours = [json.loads(l)["reference"]["ids"] for l in open(a.refdpo)]
outs, tokens = [], 0
start = time.perf_counter()
with torch.inference_mode():
    for b in range(0, len(prompts), a.batch):
        batch = prompts[b : b + a.batch]
        width = max(map(len, batch))
        ids = torch.tensor([[0] * (width - len(x)) + x for x in batch])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch])
        res = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=a.max_new_tokens,
                             pad_token_id=0, eos_token_id=list(eos) or None)
        for row in res[:, width:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            outs.append(row[:cut])
            tokens += cut
seconds = time.perf_counter() - start
print(json.dumps({"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
                  "same_continuations": sum(x == y for x, y in zip(outs, ours)), "prompts": len(prompts)}))

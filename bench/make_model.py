"""Creates a seeded random-init Llama in HF layout (transformers' own save_pretrained), with the
real SmolLM2 tokenizer, so refdpo and PyTorch read the same weights.

usage: python bench/make_model.py OUT_DIR [--layers N --hidden H --intermediate I]
"""
import argparse
import pathlib
import shutil

import torch
from transformers import LlamaConfig, LlamaForCausalLM

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--tokenizer", default="../shared/realdata/tokenizers/smollm2-135m")
p.add_argument("--layers", type=int, default=4)
p.add_argument("--hidden", type=int, default=256)
p.add_argument("--intermediate", type=int, default=768)
p.add_argument("--heads", type=int, default=4)
p.add_argument("--kv-heads", type=int, default=2)
a = p.parse_args()

torch.manual_seed(0)
cfg = LlamaConfig(
    vocab_size=49152,
    hidden_size=a.hidden,
    intermediate_size=a.intermediate,
    num_hidden_layers=a.layers,
    num_attention_heads=a.heads,
    num_key_value_heads=a.kv_heads,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
model = LlamaForCausalLM(cfg).to(torch.float32)
out = pathlib.Path(a.out)
model.save_pretrained(out, safe_serialization=True)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(pathlib.Path(a.tokenizer) / f, out / f)
print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")

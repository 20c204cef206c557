"""Creates a seeded random-init model in HF layout (transformers' own save_pretrained) with the
real SmolLM2 tokenizer, so refdpo and its peers read the same weights. Compute and memory do not
depend on weight values; real architectures come from --preset.

usage: python bench/make_model.py OUT_DIR [--preset NAME] [--layers N --hidden H --intermediate I]
       [--dtype float32|bfloat16]
presets: cpu-bench (default: the CPU benchmark's 28M Llama), tiny, qwen2-0.5b, qwen2-1.5b,
         smollm2-1.7b
"""
import argparse
import pathlib
import shutil

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

PRESETS = {
    # name: (config class, overrides)
    "cpu-bench": (LlamaConfig, dict(vocab_size=49152, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                    rms_norm_eps=1e-5)),
    "tiny": (LlamaConfig, dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                               rms_norm_eps=1e-5)),
    # Qwen/Qwen2-0.5B and Qwen/Qwen2-1.5B config.json
    "qwen2-0.5b": (Qwen2Config, dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                     num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                     tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1000000.0,
                                     max_position_embeddings=32768)),
    "qwen2-1.5b": (Qwen2Config, dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                     num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                     tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1000000.0,
                                     max_position_embeddings=32768)),
    # HuggingFaceTB/SmolLM2-1.7B config.json
    "smollm2-1.7b": (LlamaConfig, dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192,
                                       num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                                       tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=130000.0,
                                       max_position_embeddings=8192)),
}

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--preset", default="cpu-bench", choices=sorted(PRESETS))
p.add_argument("--tokenizer", default="../shared/realdata/tokenizers/smollm2-135m")
p.add_argument("--layers", type=int)
p.add_argument("--hidden", type=int)
p.add_argument("--intermediate", type=int)
p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
a = p.parse_args()

cls, kw = PRESETS[a.preset]
kw = dict(kw, bos_token_id=1, eos_token_id=2)
kw.setdefault("max_position_embeddings", 2048)
for arg, key in (("layers", "num_hidden_layers"), ("hidden", "hidden_size"), ("intermediate", "intermediate_size")):
    if getattr(a, arg) is not None:
        kw[key] = getattr(a, arg)
torch.manual_seed(0)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = AutoModelForCausalLM.from_config(cls(**kw), dtype=getattr(torch, a.dtype))
out = pathlib.Path(a.out)
model.save_pretrained(out, safe_serialization=True)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(pathlib.Path(a.tokenizer) / f, out / f)
print(f"{out}: {a.preset}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")

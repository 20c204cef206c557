"""The peer of `refdpo train`: TRL's DPOTrainer on the same model and rows, f32 weights with bf16
autocast and gradient checkpointing (how GPU.md measured TRL), with or without
`precompute_ref_log_probs`. Times each optimizer step (CUDA-synchronized) and reads torch's
peak allocation; bench/gpu.py samples the device's memory around the process as well.

usage: python bench/peer_train.py MODEL_DIR DATASET_DIR --pairs N --steps S --batch 8
       --max-length 1024 [--precompute] [--device cuda] [--lora R --lora-alpha A]
With --lora: TRL + PEFT as users run it, the base loaded in bf16 on a GPU (PEFT keeps its
adapters in f32), LoRA on every linear projection, no reference model (TRL scores the reference
with the adapters disabled).
Prints one JSON object: step_seconds (list), median_step_seconds, max_allocated_gib,
max_reserved_gib, losses.
"""
import argparse
import glob
import json
import statistics
import tempfile
import time

import torch
from datasets import Dataset
import pyarrow.parquet as pq
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("dataset")
p.add_argument("--pairs", type=int, default=96)
p.add_argument("--steps", type=int, default=10)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--max-length", type=int, default=1024)
p.add_argument("--precompute", action="store_true")
p.add_argument("--device", default="cuda")
p.add_argument("--lora", type=int, default=0)
p.add_argument("--lora-alpha", type=float, default=32)
a = p.parse_args()
cuda = a.device == "cuda"

files = sorted(glob.glob(f"{a.dataset}/data/train_prefs-*.parquet"))
rows = pq.read_table(files[0]).slice(0, a.pairs).to_pylist()
# TRL 1.16 wants conversational chosen/rejected only (tests/fixtures/TRL_NOTES.md).
ds = Dataset.from_list([{"chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
tok = AutoTokenizer.from_pretrained(a.model)
base_dtype = torch.bfloat16 if (a.lora and cuda) else torch.float32
load = lambda: AutoModelForCausalLM.from_pretrained(a.model, dtype=base_dtype).to(a.device)
model = load()
ref = None if (a.precompute or a.lora) else load()
peft_config = None
if a.lora:
    from peft import LoraConfig

    peft_config = LoraConfig(r=a.lora, lora_alpha=a.lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM")


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self.t0 = [], None

    def on_step_begin(self, args, state, control, **kw):
        if cuda:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.t0)


timer = StepTimer()
with tempfile.TemporaryDirectory() as out:
    args = DPOConfig(
        output_dir=out,
        per_device_train_batch_size=a.batch,
        precompute_ref_batch_size=a.batch,
        max_length=a.max_length,
        max_steps=a.steps,
        learning_rate=5e-7,
        bf16=cuda,
        gradient_checkpointing=True,
        precompute_ref_log_probs=a.precompute,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok,
                         callbacks=[timer], peft_config=peft_config)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
gib = 2**30
print(json.dumps({
    "step_seconds": timer.times,
    # the first steps include cuBLAS/allocator warm-up
    "median_step_seconds": statistics.median(timer.times[2:] or timer.times),
    "max_allocated_gib": torch.cuda.max_memory_allocated() / gib if cuda else None,
    "max_reserved_gib": torch.cuda.max_memory_reserved() / gib if cuda else None,
    "losses": losses,
}))

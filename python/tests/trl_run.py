"""A short TRL run from a refdpo cache, for test_trl.py: `python trl_run.py CACHE MODEL OUT
PER_DEVICE_BATCH GRAD_ACCUM STEPS`, alone or under `accelerate launch --num_processes N --cpu`.
Writes the logged training losses (one per step) to OUT/losses.json from the main process."""

import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig

import refdpo
from refdpo.trl import CachedReferenceDPOTrainer

cache, model_dir, out, per_device, accum, steps = sys.argv[1:7]
args = DPOConfig(
    output_dir=out, precompute_ref_log_probs=True, max_length=256, per_device_train_batch_size=int(per_device),
    gradient_accumulation_steps=int(accum), max_steps=int(steps), learning_rate=1e-3, lr_scheduler_type="constant",
    logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=0,
    train_sampling_strategy="sequential",  # the same batches in order, however many processes
    ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None, dataloader_drop_last=True,
)
trainer = CachedReferenceDPOTrainer(
    model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
    args=args,
    train_dataset=refdpo.load_cache(cache, "train_prefs"),
    processing_class=AutoTokenizer.from_pretrained(model_dir),
)
trainer.train()
if trainer.accelerator.is_main_process:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "losses.json").write_text(json.dumps(losses))
# Every rank leaves the process group together before exiting: otherwise gloo's threads can
# abort a rank at interpreter exit ("terminate called without an active exception", exit -6),
# after training finished, and the launcher reports the run as failed.
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()

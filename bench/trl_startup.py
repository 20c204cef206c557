#!/usr/bin/env python3
"""Time to TRL's first training step: TRL 1.16's DPOTrainer running its own reference precompute
against refdpo.trl.CachedReferenceDPOTrainer reading refdpo's cache, on the same rows and model
(BENCHMARKS.md, "TRL from a refdpo cache").

    PYTHONPATH=python python bench/trl_startup.py --cache data/cache/real-smollm2 \
        --model data/real/smollm2-135m-instruct --data ../shared/realdata/ultrafeedback_binarized_sample \
        --rows 64 --max-length 512

Each side: the trainer's construction (tokenization and, for TRL, the reference pass) and one
training step, in a fresh datasets cache so TRL cannot reuse an earlier precompute. Prints one JSON
object.
"""

import argparse
import json
import os
import sys
import tempfile
import time

parser = argparse.ArgumentParser()
parser.add_argument("--cache", required=True)
parser.add_argument("--model", required=True)
parser.add_argument("--data", required=True)
parser.add_argument("--rows", type=int, default=64)
parser.add_argument("--max-length", type=int, default=512)
parser.add_argument("--side", choices=["trl", "refdpo"], help=argparse.SUPPRESS)
a = parser.parse_args()

if a.side is None:  # each side in its own process: no shared warm state
    import subprocess

    result = {"rows": a.rows, "max_length": a.max_length, "model": a.model}
    for side in ["trl", "refdpo"]:
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "HF_DATASETS_CACHE": tmp, "TQDM_DISABLE": "1"}
            out = subprocess.run([sys.executable, *sys.argv, "--side", side], env=env, check=True,
                                 capture_output=True, text=True).stdout
            result[side] = json.loads(out.strip().splitlines()[-1])
    result["ratio_refdpo_over_trl"] = result["refdpo"]["to_first_step_s"] / result["trl"]["to_first_step_s"]
    print(json.dumps(result, indent=1))
    sys.exit(0)

start = time.perf_counter()
import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

import refdpo  # noqa: E402
from refdpo.trl import CachedReferenceDPOTrainer  # noqa: E402

imported = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(a.model)
args = DPOConfig(output_dir=tempfile.mkdtemp(), precompute_ref_log_probs=True, max_length=a.max_length,
                 per_device_train_batch_size=4, max_steps=1, report_to=[], use_cpu=True, bf16=False,
                 save_strategy="no", logging_steps=1, precompute_ref_batch_size=8)
if a.side == "trl":
    ds = load_dataset("parquet", data_files=os.path.join(a.data, "data/train_prefs-00000-of-00001.parquet"),
                      split="train").select(range(a.rows)).remove_columns(["prompt", "messages"])
    make = lambda: DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)  # noqa: E731
else:
    ds = refdpo.load_cache(a.cache, "train_prefs")
    ds = ds.select([i for i, r in enumerate(ds["row"]) if r < a.rows])
    make = lambda: CachedReferenceDPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)  # noqa: E731


class FirstStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        self.at = time.perf_counter()


loaded = time.perf_counter()
trainer = make()
built = time.perf_counter()
cb = FirstStep()
trainer.add_callback(cb)
trainer.train()
print(json.dumps({
    "rows_trained_from": len(trainer.train_dataset),
    "import_s": imported - start,
    "load_model_s": loaded - imported,
    "construct_s": built - loaded,
    "first_step_s": cb.at - built,
    "to_first_step_s": cb.at - loaded,
}))

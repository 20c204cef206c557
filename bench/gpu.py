"""The GPU benchmark (BENCHMARKS.md, "GPU"): refdpo against transformers / TRL on the same
device, in one process tree, on random-init models of real architectures and real UltraFeedback
rows. One stage per call of the device tool (each must end inside 10 minutes):

  python3 bench/gpu.py matmul
  python3 bench/gpu.py precompute --models qwen2-0.5b,qwen2-1.5b,smollm2-1.7b
  python3 bench/gpu.py train --models smollm2-1.7b

Environment: REFDPO (the refdpo command; default `.gpu/refdpo`), REAL (the real-data folder;
default `.gpu/realdata`, else `../shared/realdata`), OUT (where results go; default
bench/results). `--device cpu --models tiny` runs the same flow on a CPU (a dry run of the
script, no figures). Results: OUT/gpu-<stage>.json, and a Markdown table on stdout.
"""
import argparse
import json
import os
import math
import pathlib
import shlex
import shutil

import pyarrow.parquet as pq
import statistics
import subprocess
import sys
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent
p = argparse.ArgumentParser()
p.add_argument("stage", choices=["matmul", "precompute", "train"])
p.add_argument("--models", default="qwen2-0.5b,qwen2-1.5b,smollm2-1.7b")
p.add_argument("--device", default="cuda")
p.add_argument("--pairs", type=int, default=256, help="precompute: train rows scored")
p.add_argument("--steps", type=int, default=10, help="train: optimizer steps per setup")
p.add_argument("--batch", type=int, default=8, help="train: pairs per step")
p.add_argument("--max-length", type=int, default=1024)
p.add_argument("--work", default="/tmp/refdpo-gpu-bench")
# HuggingFaceH4/ultrafeedback_binarized's train_prefs split: the rows issue 24 extrapolates stage one to
TRAIN_PREFS_ROWS = 61_135
SETUPS = ["refdpo_cached_bf16_state", "refdpo_cached_bf16_masters", "refdpo_cached_bf16_masters_1gib",
          "refdpo_cached_8bit", "refdpo_cached_f32_state", "refdpo_live_bf16_state",
          "trl_live", "trl_precompute", "refdpo_cached_lora", "trl_live_lora"]
# LoRA setups: r 16, alpha 32, all linear projections, a bf16 base (refdpo: frozen in bf16 with
# f32 adapters; TRL + PEFT: the base loaded in bf16, PEFT's f32 adapters, the adapter-disabled
# model as the reference)
LORA_R, LORA_ALPHA = 16, 32
p.add_argument("--setups", default=",".join(SETUPS), help="train: which of " + ", ".join(SETUPS))
p.add_argument("--profile", action="store_true",
               help="then run refdpo once more with --profile and keep its phase table in OUT/profile-*.txt")
a = p.parse_args()
a.setups = a.setups.split(",")
if unknown := set(a.setups) - set(SETUPS):
    p.error(f"--setups: unknown {sorted(unknown)}; choose from {SETUPS}")
cuda = a.device == "cuda"
REFDPO = shlex.split(os.environ.get("REFDPO", ".gpu/refdpo"))
REAL = pathlib.Path(os.environ.get("REAL") or (".gpu/realdata" if pathlib.Path(".gpu/realdata").is_dir() else "../shared/realdata"))
OUT = pathlib.Path(os.environ.get("OUT") or "bench/results")
WORK = pathlib.Path(a.work)
WORK.mkdir(parents=True, exist_ok=True)
OUT.mkdir(parents=True, exist_ok=True)
GIB = 2**30


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class MemorySampler:
    """Peak device memory in use (NVML, every 20 ms) above what was in use before the command:
    one process runs at a time, so this is that process's footprint, CUDA context included."""

    def __init__(self):
        self.peak = 0
        if not cuda:
            return
        import pynvml

        pynvml.nvmlInit()
        self.nvml, self.h = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        self.base = self.used()

    def used(self):
        return self.nvml.nvmlDeviceGetMemoryInfo(self.h).used

    def run(self, cmd, **kw):
        done = threading.Event()

        def sample():
            while not done.is_set():
                self.peak = max(self.peak, self.used() - self.base)
                time.sleep(0.02)

        t = threading.Thread(target=sample)
        if cuda:
            t.start()
        start = time.perf_counter()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, **kw)
        finally:
            done.set()
            if cuda:
                t.join()
        if r.returncode != 0:
            log(r.stdout[-4000:] + r.stderr[-4000:])
            raise SystemExit(f"failed ({r.returncode}): {' '.join(map(str, cmd))}: {r.stderr.strip()[-300:]}")
        return r.stdout, time.perf_counter() - start


def make_model(preset):
    d = WORK / f"model-{preset}"
    if not (d / "config.json").exists():
        subprocess.run([sys.executable, HERE / "make_model.py", d, "--preset", preset, "--dtype", "bfloat16",
                        "--tokenizer", REAL / "tokenizers/smollm2-135m"], check=True, stdout=sys.stderr)
    return d


def params(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    h, i, l, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    block = h * (2 * h + 2 * kv) + 3 * h * i
    return cfg, block * l, v * h


def pipeline(model_dir, name, limit, model_dtype=None, **train):
    """A config for `name`'s cache (one per model dtype) and run; `model_dtype`: the reference's
    dtype when not the device's default (bf16 on CUDA, f32 on the CPU)."""
    cache = "cache-" + name + (f"-{model_dtype}" if model_dtype else "")
    model_dtype = model_dtype or ("bf16" if cuda else "f32")
    text = f"""
[dataset]
id = "{REAL / 'ultrafeedback_binarized_sample'}"
limit = {limit}
[model]
id = "{model_dir}"
dtype = "{model_dtype}"
[tokenize]
max_length = {a.max_length}
[precompute]
batch_size = 16
out = "{WORK / cache}"
[train]
out = "{WORK / ('run-' + name)}"
""" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in train.items() if k != "lora") + (
        f"\n[train.lora]\nr = {train['lora'][0]}\nalpha = {train['lora'][1]}\n" if "lora" in train else "")
    path = WORK / f"{name}.toml"
    path.write_text(text)
    return path


def refdpo(*args):
    return [*REFDPO, *map(str, args), "--device", a.device, "--quiet"]


def profiled(name, fresh, *args):
    """One more refdpo run with --profile (slower: it syncs the device at each phase boundary);
    its phase table goes to OUT/profile-<name>.txt. `fresh`: the output folder to delete first
    (an up-to-date cache would be kept, and time nothing)."""
    shutil.rmtree(fresh, ignore_errors=True)
    r = subprocess.run(refdpo(*args, "--overwrite", "--profile"), capture_output=True, text=True)
    (OUT / f"profile-{name}.txt").write_text(r.stderr)
    log(r.stderr[-3000:])
    if r.returncode != 0:
        raise SystemExit(f"profiled run failed ({r.returncode}): {name}")


def matmul():
    import torch

    n, reps = 8192, 10
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        x @ y
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        x @ y
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def common_prefix(a, b):
    """How many first ids a and b have in common."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def write_json(path, res):
    """The results so far, written whole (a temporary renamed): a stage killed at its limit
    leaves the last complete file, never a truncated one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    os.replace(tmp, path)


def attempt(name, fn):
    """fn()'s result, or {"error": why} when it fails (a command's failure, a missing file): one
    model or setup that fails must not cost the call the others' figures."""
    try:
        return fn()
    except (SystemExit, Exception) as e:  # noqa: BLE001 - recorded and reported, never fatal
        log(f"{name} failed: {e}")
        return {"error": str(e)[-500:]}


def stage_precompute():
    # which refdpo kernels ran: unset (every fused one), REFDPO_FUSED=-name,… or 0 (bench/device.sh)
    res = {"setup": vars(a), "refdpo_fused": os.environ.get("REFDPO_FUSED"), "models": {}}
    if cuda:
        # a CUDA error here (a busy card) costs the ceiling, not the models' figures
        ceiling = attempt("matmul", matmul)
        if not isinstance(ceiling, dict):
            res["matmul_bf16_flops"] = ceiling

    def one(preset):
        model = make_model(preset)
        cfg, block_params, head_params = params(model)
        # warm-up: candle compiles its PTX at first use
        MemorySampler().run(refdpo("precompute", "--config", pipeline(model, f"{preset}-warm", 16), "--overwrite"))
        toml = pipeline(model, preset, a.pairs)
        # a cache left by an earlier call would be up to date, and time nothing
        shutil.rmtree(WORK / f"cache-{preset}", ignore_errors=True)
        _, wall = MemorySampler().run(refdpo("precompute", "--config", toml))
        rep = json.loads((WORK / f"cache-{preset}" / "report.json").read_text())["train_prefs"]
        peer_out, _ = MemorySampler().run([sys.executable, HERE / "peer_precompute.py", model,
                                           WORK / f"cache-{preset}" / "train_prefs.parquet", "--batch", "8,16,32",
                                           "--device", a.device, "--dtype", "bfloat16" if cuda else "float32"])
        # its last line: a stray line from torch or transformers must not cost the row
        peer = json.loads(peer_out.strip().splitlines()[-1])
        # forward FLOPs of the peer's work (every position through every block and lm_head), plus
        # causal attention (QKᵀ and PV: 2·T²·H per layer per sequence, halved by the mask)
        rows = pq.read_table(WORK / f"cache-{preset}" / "train_prefs.parquet").to_pylist()
        lens = [len(r["prompt_ids"]) + len(r[k]) for r in rows for k in ("chosen_ids", "rejected_ids")]
        per_token, attention = 2 * (block_params + head_params), 2 * cfg["num_hidden_layers"] * cfg["hidden_size"]
        flops = sum(per_token * n + attention * n * n for n in lens)
        # what refdpo computes: each pair's shared first positions once (the common prefix of its
        # two sequences, each keeping one position of its own; the attention over whole sequences)
        shared = [min(common_prefix(r["prompt_ids"] + r["chosen_ids"], r["prompt_ids"] + r["rejected_ids"]),
                      len(r["prompt_ids"]) + len(r["rejected_ids"]) - 1) for r in rows]
        ours_flops = flops - per_token * sum(shared)
        ours_s = rep["score_seconds"]
        # issue 24's extrapolation: the whole train_prefs split at this sample's tokens per row read
        split_tokens = TRAIN_PREFS_ROWS * rep["tokens"] / rep["rows_read"]
        out = {
            "train_prefs_minutes_scoring": split_tokens / (rep["tokens"] / ours_s) / 60,
            "train_prefs_minutes_process": split_tokens / (rep["tokens"] / wall) / 60,
            "tokens": rep["tokens"], "refdpo_score_seconds": ours_s, "refdpo_process_seconds": wall,
            "refdpo_tokens_per_second": rep["tokens"] / ours_s, "peer_tokens_per_second": peer["tokens_per_second"],
            "ratio": (rep["tokens"] / ours_s) / peer["tokens_per_second"], "max_rel_diff": peer["max_rel_diff"],
            # transformers at its best batch of 8, 16 and 32 pairs (issue 24), and each one's tokens/s
            "peer_batch": peer.get("batch"), "peer_tokens_per_second_by_batch": peer.get("by_batch"),
            # model FLOP/s: refdpo's own work (shared positions once), and the peer's
            "refdpo_flops_per_second": ours_flops / ours_s, "peer_flops_per_second": flops / peer["seconds"],
            "shared_token_fraction": sum(shared) / sum(lens),
        }
        log(f"{preset}: {out}")
        if a.profile:
            attempt(f"profile {preset}", lambda: profiled(f"precompute-{preset}", WORK / f"cache-{preset}",
                                                          "precompute", "--config", toml))
        return out

    # each model on its own: a failure is recorded and the next one still runs; the JSON is
    # written after each, so a stage cut off by its time limit keeps what finished
    def whole(preset):
        """The same scoring with every sequence whole (REFDPO_SHARE_PROMPTS=0), as the peer
        computes it: what computing each pair's prompt once gains on this device."""
        toml = pipeline(make_model(preset), f"{preset}-whole", a.pairs)
        shutil.rmtree(WORK / f"cache-{preset}-whole", ignore_errors=True)
        MemorySampler().run(refdpo("precompute", "--config", toml), env={**os.environ, "REFDPO_SHARE_PROMPTS": "0"})
        rep = json.loads((WORK / f"cache-{preset}-whole" / "report.json").read_text())["train_prefs"]
        shared = res["models"][preset]["refdpo_tokens_per_second"]
        return {"tokens_per_second_whole": rep["tokens"] / rep["score_seconds"],
                "shared_over_whole": shared / (rep["tokens"] / rep["score_seconds"])}

    for preset in a.models.split(","):
        res["models"][preset] = attempt(preset, lambda: one(preset))
        write_json(OUT / "gpu-precompute.json", res)
    # last, so that it can cost no other figure: the first model's scoring with every sequence whole
    first = a.models.split(",")[0]
    if "error" not in res["models"][first]:
        res["models"][first]["whole_sequences"] = attempt(f"{first} whole", lambda: whole(first))
        write_json(OUT / "gpu-precompute.json", res)
    ceiling = res.get("matmul_bf16_flops")
    print("| model | tokens | refdpo tok/s | transformers tok/s (best batch) | ratio | refdpo TFLOP/s | % of bf16 matmul |")
    print("|---|---|---|---|---|---|---|")
    for m, r in res["models"].items():
        if "error" in r:
            print(f"| {m} | failed: {r['error']} | | | | | |")
            continue
        pct = f"{100 * r['refdpo_flops_per_second'] / ceiling:.0f}%" if ceiling else "-"
        print(f"| {m} | {r['tokens']} | {r['refdpo_tokens_per_second']:.0f} | {r['peer_tokens_per_second']:.0f} ({r.get('peer_batch')}) | "
              f"**{r['ratio']:.2f}×** | {r['refdpo_flops_per_second'] / 1e12:.0f} | {pct} |")
    if ceiling:
        print(f"bf16 matmul ceiling (torch, 8192³): {ceiling / 1e12:.0f} TFLOP/s")
    for m, r in ((m, r) for m, r in res["models"].items() if "error" not in r):
        w = r.get("whole_sequences", {})
        if "shared_over_whole" in w:
            print(f"{m}: {100 * r['shared_token_fraction']:.0f}% of the tokens shared; every sequence whole "
                  f"(REFDPO_SHARE_PROMPTS=0): {w['tokens_per_second_whole']:.0f} tok/s, prompts shared "
                  f"{w['shared_over_whole']:.2f}× that")
        print(f"{m}: UltraFeedback's whole train_prefs ({TRAIN_PREFS_ROWS:,} pairs) at these rows' tokens per pair: "
              f"{r['train_prefs_minutes_scoring']:.1f} min scoring, {r['train_prefs_minutes_process']:.1f} min as this "
              f"whole process ran (goal: 4 min)")


def median_step(run_dir):
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    s = [l["step_seconds"] for l in lines if "step_seconds" in l]
    return statistics.median(s[2:] or s), [l["loss"] for l in lines if "loss" in l and "eval/loss" not in l]


def stage_train():
    # which refdpo kernels ran: unset (every fused one), REFDPO_FUSED=-name,… or 0 (bench/device.sh)
    res = {"setup": vars(a), "refdpo_fused": os.environ.get("REFDPO_FUSED"), "models": {}}
    pairs = a.batch * (a.steps + 1)
    for preset in a.models.split(","):
        model = make_model(preset)
        cfg, block_params, head_params = params(model)
        # no final/ checkpoint: f32 weights plus moments would be ~20 GB a run on a 64 GB disk
        common = dict(batch_size=a.batch, max_steps=a.steps, learning_rate=5e-7, warmup_ratio=0.0, log_every=1,
                      save_final=False)
        base = pipeline(model, preset, pairs, **common)
        # the precompute stage's cache of this model has another limit: replace it
        attempt(f"{preset} precompute", lambda: MemorySampler().run(refdpo("precompute", "--config", base,
                                                                          "--overwrite")))
        r = {"params": block_params + head_params}
        ours_extra = {
            "refdpo_cached_bf16_state": {"state_dtype": "bf16"},
            "refdpo_cached_bf16_masters": {"state_dtype": "bf16", "master_dtype": "bf16"},
            # the same with a 1 GiB recompute budget (512 MiB by default): one sub-batch where the
            # default takes two (SmolLM2-1.7B at real lengths), time against memory
            "refdpo_cached_bf16_masters_1gib": {"state_dtype": "bf16", "master_dtype": "bf16",
                                                "env": {"REFDPO_RECOMPUTE_MIB": "1024"}},
            # bitsandbytes' AdamW8bit moments (TRL's optim="adamw_8bit"); the peer keeps
            # adamw_torch: bitsandbytes is not installed there
            "refdpo_cached_8bit": {"state_dtype": "bf16", "master_dtype": "bf16", "optim": "adamw_8bit"},
            "refdpo_cached_f32_state": {"state_dtype": "f32"},
            "refdpo_live_bf16_state": {"state_dtype": "bf16", "ref": "live"},
            "refdpo_cached_lora": {"lora": (LORA_R, LORA_ALPHA)},
        }
        peer_flags = {"trl_live": [], "trl_precompute": ["--precompute"],
                      "trl_live_lora": ["--lora", str(LORA_R), "--lora-alpha", str(LORA_ALPHA)]}

        def ours(name):
            env = ours_extra[name].get("env", {})
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                return ours_with(name)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v

        def ours_with(name):
            extra = {k: v for k, v in ours_extra[name].items() if k != "env"}
            if extra.get("master_dtype") == "bf16" and not cuda:
                # bf16 masters need a bf16 reference: the CPU dry run's cache is f32
                toml = pipeline(model, preset, pairs, model_dtype="bf16", **common, **extra)
                MemorySampler().run(refdpo("precompute", "--config", toml, "--overwrite"))
            else:
                toml = pipeline(model, preset, pairs, **common, **extra)
            sampler = MemorySampler()
            # --overwrite: a run left by an earlier call in this work folder is replaced
            sampler.run(refdpo("train", "--config", toml, "--overwrite",
                               "--set", f'train.out="{WORK / ("run-" + name)}"'))
            step, losses = median_step(WORK / f"run-{name}")
            return {"peak_gib": sampler.peak / GIB, "median_step_s": step, "losses": losses}

        def peer(name):
            sampler = MemorySampler()
            out, _ = sampler.run([sys.executable, HERE / "peer_train.py", model,
                                  REAL / "ultrafeedback_binarized_sample", "--pairs", str(pairs), "--steps",
                                  str(a.steps), "--batch", str(a.batch), "--max-length", str(a.max_length),
                                  "--device", a.device, *peer_flags[name]])
            out = json.loads(out.strip().splitlines()[-1])
            return {"peak_gib": sampler.peak / GIB, "median_step_s": out["median_step_seconds"],
                    "torch_max_allocated_gib": out["max_allocated_gib"], "losses": out["losses"]}

        # in the order --setups names them (bench/device.sh puts each comparison's pair first,
        # so a stage cut off by its time limit still has one); each written as it finishes
        for name in a.setups:
            r[name] = attempt(f"{preset} {name}", lambda: ours(name) if name in ours_extra else peer(name))
            log(f"{preset} {name}: {r[name]}")
            res["models"][preset] = r
            write_json(OUT / "gpu-train.json", res)
        if a.profile:
            toml = pipeline(model, preset, pairs, **common, state_dtype="bf16")
            attempt(f"profile train {preset}", lambda: profiled(f"train-{preset}", WORK / "run-profile", "train",
                                                                "--config", toml, "--set",
                                                                f'train.out="{WORK / "run-profile"}"'))
        res["models"][preset] = r
    write_json(OUT / "gpu-train.json", res)
    # "vs TRL live": LoRA rows against TRL + PEFT live
    print("| model | setup | peak GiB (device) | vs TRL live | median step s | vs TRL live | first loss − ln 2 |")
    print("|---|---|---|---|---|---|---|")
    for m, r in res["models"].items():
        for name in (s for s in SETUPS if s in r):
            # LoRA against TRL + PEFT's LoRA, the rest against TRL's full fine-tuning
            ref = r.get("trl_live_lora" if name.endswith("_lora") else "trl_live")
            ref = ref if ref and "error" not in ref else None
            x = r[name]
            if "error" in x:
                print(f"| {m} | {name} | failed: {x['error'][-200:]} | | | | |")
                continue
            mem = f"{x['peak_gib'] / max(ref['peak_gib'], 1e-9):.2f}×" if ref else "-"
            step = f"{x['median_step_s'] / ref['median_step_s']:.2f}×" if ref else "-"
            first = f"{x['losses'][0] - math.log(2):+.1e}" if x["losses"] else "-"
            print(f"| {m} | {name} | {x['peak_gib']:.2f} | {mem} | {x['median_step_s']:.3f} | {step} | {first} |")


if a.stage == "matmul":
    print(f"bf16 matmul 8192³: {matmul() / 1e12:.0f} TFLOP/s")
elif a.stage == "precompute":
    stage_precompute()
else:
    stage_train()

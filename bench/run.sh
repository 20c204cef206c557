#!/usr/bin/env bash
# `make bench` (CPU): refdpo against PyTorch/transformers in one run, on the same pairs, the same
# weights and the same number of threads, reported as ratios.
#   stage one: refdpo's whole `precompute` process vs torch's forward + log-probs alone
#   stage two: refdpo train step time and peak memory, cached reference vs `ref = "live"`, the
#              cached run with bf16 gradients and AdamW moments (`train.state_dtype`), the same
#              with bitsandbytes' 8-bit moments (`train.optim = "adamw_8bit"`), and LoRA
#              (r 16, all-linear) against full fine-tuning on the same model
#   generate:  refdpo generate vs transformers' generate(do_sample=False), greedy, 16 prompts,
#              64 new tokens, batches of 8, decoding tokens/s and identical continuations
# Knobs: THREADS (2), PAIRS (32 per split), MAXLEN (512), PROFILE (dev: dependencies — candle's
# kernels included — are always optimized; `release` also optimizes refdpo's own crate),
# PYTHON (an interpreter that already has bench/requirements.txt; else bench/.venv is made),
# REFDPO_BIN (a built refdpo binary to measure instead of building one: `make bench REFDPO=...`).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
PAIRS=${PAIRS:-32}
MAXLEN=${MAXLEN:-512}
PROFILE=${PROFILE:-dev}
REAL=../shared/realdata
if [ ! -d "$REAL" ]; then
  echo "make bench needs ../shared/realdata (real UltraFeedback rows and the SmolLM2 tokenizer)" >&2
  exit 1
fi
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  VENV=bench/.venv
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -r bench/requirements.txt
  fi
  PY="$VENV/bin/python"
fi
W=bench/work
rm -rf "$W"
mkdir -p "$W" bench/results
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
"$PY" bench/make_model.py "$W/model" --preset cpu-bench
if [ -n "${REFDPO_BIN:-}" ]; then
  REFDPO=("$REFDPO_BIN")
else
  cargo build --profile "$PROFILE" --quiet --bin refdpo
  REFDPO=(cargo run --profile "$PROFILE" --quiet --bin refdpo --)
fi
cat > "$W/bench.toml" <<TOML
[dataset]
id = "$REAL/ultrafeedback_binarized_sample"
limit = $PAIRS
[model]
id = "$W/model"
dtype = "f32"
[tokenize]
max_length = $MAXLEN
[precompute]
batch_size = 8
out = "$W/cache"
[train]
out = "$W/run"
learning_rate = 1e-5
batch_size = 4
max_steps = 6
warmup_ratio = 0.0
TOML
echo "== stage one: refdpo precompute (whole process) vs torch forward + log-probs"
ours=$("$PY" bench/measure.py -- "${REFDPO[@]}" precompute --config "$W/bench.toml" --quiet)
peer_train=$("$PY" bench/peer_precompute.py "$W/model" "$W/cache/train_prefs.parquet" --threads "$THREADS" --batch 8)
peer_test=$("$PY" bench/peer_precompute.py "$W/model" "$W/cache/test_prefs.parquet" --threads "$THREADS" --batch 8)
echo "== stage two: refdpo train, cached vs live reference (6 steps, 4 pairs)"
cached=$("$PY" bench/measure.py -- "${REFDPO[@]}" train --config "$W/bench.toml" --quiet)
cp "$W/run/metrics.jsonl" "$W/metrics-cached.jsonl"
live=$("$PY" bench/measure.py -- "${REFDPO[@]}" train --config "$W/bench.toml" --quiet --set train.ref=live --set train.out="$W/run-live")
lean=$("$PY" bench/measure.py -- "${REFDPO[@]}" train --config "$W/bench.toml" --quiet --set train.state_dtype=bf16 --set train.out="$W/run-bf16")
eight=$("$PY" bench/measure.py -- "${REFDPO[@]}" train --config "$W/bench.toml" --quiet --set train.state_dtype=bf16 --set train.optim='"adamw_8bit"' --set train.out="$W/run-8bit")
lora=$("$PY" bench/measure.py -- "${REFDPO[@]}" train --config "$W/bench.toml" --quiet --set train.lora.r=16 --set train.lora.alpha=32 --set train.learning_rate=1e-4 --set train.out="$W/run-lora")
echo "== generate: refdpo vs transformers generate (greedy, 16 prompts, 64 new tokens)"
gen_out=$("${REFDPO[@]}" generate --config "$W/bench.toml" --quiet --split train_prefs --limit 16 --max-new-tokens 64 --out "$W/gen.jsonl" | tail -1)
echo "$gen_out"
"$PY" bench/peer_generate.py "$W/model" "$W/cache/train_prefs.parquet" "$W/gen.jsonl" --limit 16 --batch 8 --max-new-tokens 64 --threads "$THREADS"
"$PY" - "$W" "$ours" "$peer_train" "$peer_test" "$cached" "$live" "$lean" "$lora" "$eight" "$THREADS" "$PAIRS" "$MAXLEN" <<'PY'
import json, statistics, sys, pathlib
w, ours, pt, pe, cached, live, lean, lora, eight = sys.argv[1], *map(json.loads, sys.argv[2:10])
threads, pairs, maxlen = sys.argv[10:13]
report = json.loads(pathlib.Path(w, "cache/report.json").read_text())
tokens = sum(report[s]["tokens"] for s in report)
peer_s = pt["seconds"] + pe["seconds"]
def step_median(path):
    lines = [json.loads(l) for l in pathlib.Path(path).read_text().splitlines()]
    return statistics.median(l["step_seconds"] for l in lines if "step_seconds" in l)
sc, sl = step_median(f"{w}/metrics-cached.jsonl"), step_median(f"{w}/run-live/metrics.jsonl")
sb = step_median(f"{w}/run-bf16/metrics.jsonl")
sr = step_median(f"{w}/run-lora/metrics.jsonl")
s8 = step_median(f"{w}/run-8bit/metrics.jsonl")
res = {
    "setup": {"profile": __import__("os").environ.get("PROFILE", "dev"), "threads": int(threads), "pairs_per_split": int(pairs), "max_length": int(maxlen), "model": "random Llama, vocab 49152, 4 layers, hidden 256 (bench/make_model.py)"},
    "precompute": {"tokens": tokens, "refdpo_process_seconds": ours["seconds"], "refdpo_peak_rss_mib": ours["peak_rss_mib"],
                   "refdpo_user_s": ours["user_s"], "refdpo_sys_s": ours["sys_s"],
                   "torch_forward_seconds": peer_s, "torch_tokens": pt["tokens"] + pe["tokens"],
                   "max_rel_diff_vs_torch": max(pt["max_rel_diff"], pe["max_rel_diff"]),
                   "ratio_torch_forward_over_refdpo_process": peer_s / ours["seconds"]},
    "train": {"cached_step_median_s": sc, "live_step_median_s": sl, "cached_peak_rss_mib": cached["peak_rss_mib"],
              "live_peak_rss_mib": live["peak_rss_mib"], "step_time_ratio_cached_over_live": sc / sl,
              "peak_rss_ratio_cached_over_live": cached["peak_rss_mib"] / live["peak_rss_mib"],
              "cached_bf16_state_step_median_s": sb, "cached_bf16_state_peak_rss_mib": lean["peak_rss_mib"],
              "peak_rss_ratio_bf16_state_over_live": lean["peak_rss_mib"] / live["peak_rss_mib"],
              "cached_8bit_step_median_s": s8, "cached_8bit_peak_rss_mib": eight["peak_rss_mib"],
              "peak_rss_ratio_8bit_over_live": eight["peak_rss_mib"] / live["peak_rss_mib"],
              "lora_r16_step_median_s": sr, "lora_r16_peak_rss_mib": lora["peak_rss_mib"],
              "step_time_ratio_lora_over_full": sr / sc,
              "peak_rss_ratio_lora_over_full": lora["peak_rss_mib"] / cached["peak_rss_mib"]},
}
pathlib.Path("bench/results/cpu-latest.json").write_text(json.dumps(res, indent=1) + "\n")
p, t = res["precompute"], res["train"]
print(f"""
| stage one ({tokens} tokens, {threads} threads) | seconds | tokens/s |
|---|---|---|
| refdpo precompute, whole process (load, tokenize, forward, write) | {p['refdpo_process_seconds']:.2f} | {tokens / p['refdpo_process_seconds']:.0f} |
| PyTorch/transformers forward + log-probs alone | {peer_s:.2f} | {p['torch_tokens'] / peer_s:.0f} |
| **ratio** (torch forward time / refdpo whole-process time; >= 1 means refdpo is faster) | **{p['ratio_torch_forward_over_refdpo_process']:.2f}x** | |
max relative difference of the log-probs, refdpo vs torch: {p['max_rel_diff_vs_torch']:.2e}
refdpo's CPU time: user {p['refdpo_user_s']:.2f} s, sys {p['refdpo_sys_s']:.2f} s (the kernel's share: page faults of fresh buffers)

| stage two (4 pairs/step) | median step s | peak RSS MiB |
|---|---|---|
| refdpo, cached reference | {sc:.3f} | {cached['peak_rss_mib']:.0f} |
| refdpo, live reference | {sl:.3f} | {live['peak_rss_mib']:.0f} |
| refdpo, cached, bf16 gradients + moments | {sb:.3f} | {lean['peak_rss_mib']:.0f} |
| **ratio cached / live** | **{sc / sl:.2f}x** | **{cached['peak_rss_mib'] / live['peak_rss_mib']:.2f}x** |
| **ratio cached bf16 state / live** | **{sb / sl:.2f}x** | **{lean['peak_rss_mib'] / live['peak_rss_mib']:.2f}x** |
| refdpo, cached, bf16 gradients + 8-bit moments (`adamw_8bit`) | {s8:.3f} | {eight['peak_rss_mib']:.0f} |
| **ratio cached 8-bit moments / live** | **{s8 / sl:.2f}x** | **{eight['peak_rss_mib'] / live['peak_rss_mib']:.2f}x** |
| refdpo, cached, LoRA r 16 all-linear (frozen base) | {sr:.3f} | {lora['peak_rss_mib']:.0f} |
| **ratio LoRA / full fine-tuning (both cached)** | **{sr / sc:.2f}x** | **{lora['peak_rss_mib'] / cached['peak_rss_mib']:.2f}x** |
(results also in bench/results/cpu-latest.json)""")
PY

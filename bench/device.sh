#!/usr/bin/env bash
# The one prepared call on the GPU host (BENCHMARKS.md, "GPU"): at most ~8 minutes, everything
# into $OUT. In order, each stage under its own time limit:
#   0. the tiled attention's committed cubins against the composed ops and SDPA (`--flash`);
#   1. refdpo selftest on the GPU against the CPU f32 reference, with the fused ops; if a fused
#      kernel's own check fails, again without the kernels that failed (the REFDPO_FUSED=-name,…
#      line the selftest prints: their composed ops in their place), which then run the
#      benchmarks; if no kernel was named, again with every sequence whole
#      (REFDPO_SHARE_PROMPTS=0: each pair's prompt is computed once by default, new and never
#      run on a GPU); if that fails too, with the composed ops everywhere (REFDPO_FUSED=0); if
#      that fails too, the benchmarks still run (the peers' figures need no refdpo), with the
#      composed ops, marked unverified in stages.txt;
#   2. precompute tokens/s against transformers (bf16, SDPA) on the Qwen2-0.5B and Qwen2-1.5B
#      architectures, with the bf16 matmul ceiling, then Qwen2-0.5B with every sequence whole;
#   3. one training setup (Qwen2-0.5B, 8 pairs × max_length 1024): refdpo cached with bf16
#      state, the same with bf16 master weights (`train.master_dtype`), and with 8-bit AdamW
#      moments on top (`train.optim = "adamw_8bit"`), live, against TRL live and
#      TRL precompute_ref_log_probs, and LoRA (r 16, all-linear) against TRL + PEFT, peak device
#      memory measured from outside (NVML). (f32 state: `--setups` of bench/gpu.py.)
# Carry [".gpu", ".whl"]: .gpu/refdpo.xz (stripped, xz -9), .gpu/realdata (the real-data subset),
# .whl (TRL 1.16, PEFT 0.21, datasets 5.2, dill, multiprocess wheels).
# `bash bench/device.sh --profile`: the short follow-up (~4 minutes): selftest, precompute on
# Qwen2-0.5B, then refdpo cached (bf16 state) against TRL live at the same training setup, each
# followed by one `--profile` run whose phase table lands in $OUT/profile-*.txt. It goes on after
# a failed selftest.
# `bash bench/device.sh --lora` (~4 minutes): selftest, then training only, LoRA against TRL +
# PEFT next to the full fine-tuning pair (refdpo cached bf16 state, TRL live).
# `bash bench/device.sh --big` (~4 minutes): selftest, then training only at the SmolLM2-1.7B
# architecture (the issue's second training size), refdpo cached (bf16 state; bf16 state and
# masters) against TRL live.
# `bash bench/device.sh --flash` (~2 minutes, needs no refdpo binary, only the checkout and the
# host's torch): the tiled attention's committed cubins checked and timed against SDPA
# (src/model/fused/triton/device_check.py); the full run does it first too.
# `bash bench/device.sh --tune` (~3 minutes, no binary either): the attention's tile
# configurations (device_check.py's TUNE) timed through Triton's JIT at the Qwen2-0.5B and 1.5B
# shapes, into $OUT/flash_tune.json: what flash_attn.CONFIGS should say.
# Dry run on a CPU (tiny models, no figures): `bash bench/device.sh --cpu`, with REFDPO set to a
# refdpo command and a Python that has bench/requirements.txt and TRL (PYTHON).
# The device tool returns at most 8 files: $OUT gets log.txt (every stage's output), stages.txt
# (the card, each stage's exit and time, the ops chosen), flash_check.json or flash_tune.json,
# gpu-precompute.json, gpu-train.json and with --profile two profile-*.txt. Do not tee into $OUT.
# One deadline (BUDGET seconds from the start, default 530, for a call of ~560 s): each stage's
# limit is cut to what is left, so the last stage ends under its own timeout, not the tool's kill.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
PRE_MODELS=qwen2-0.5b,qwen2-1.5b
TRAIN_MODELS=qwen2-0.5b
SIZE=()
EXTRA=()
FLASH_ONLY=
FLASH_ARGS=()
NO_FLASH=
# in the order they run: each comparison's pair first, so a stage cut off by its limit keeps one
TRAIN_SETUPS=refdpo_cached_bf16_state,trl_live,refdpo_cached_8bit,refdpo_cached_bf16_masters,refdpo_cached_lora,trl_live_lora,refdpo_live_bf16_state,trl_precompute
for arg in "$@"; do
  case $arg in
    --flash) FLASH_ONLY=1 ;;
    --tune) FLASH_ONLY=1 FLASH_ARGS=(--tune) ;;
    --cpu) DEVICE=cpu PRE_MODELS=tiny TRAIN_MODELS=tiny SIZE=(--pairs 16 --steps 3 --max-length 256) ;;
    --profile) PRE_MODELS=${PRE_MODELS%%,*} EXTRA=(--profile) TRAIN_SETUPS=refdpo_cached_bf16_state,trl_live NO_FLASH=1 ;;
    --lora) PRE_MODELS="" TRAIN_SETUPS=refdpo_cached_lora,trl_live_lora,refdpo_cached_bf16_state,trl_live NO_FLASH=1 ;;
    --big) PRE_MODELS="" TRAIN_MODELS=smollm2-1.7b TRAIN_SETUPS=refdpo_cached_bf16_state,trl_live,refdpo_cached_8bit,refdpo_cached_bf16_masters,refdpo_cached_bf16_masters_1gib NO_FLASH=1 ;;
    *) echo "usage: bench/device.sh [--cpu] [--profile] [--lora] [--big] [--flash] [--tune]" >&2; exit 2 ;;
  esac
done
SIZE+=(--setups "$TRAIN_SETUPS")
export OUT=${OUT:-bench/results/device} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
END=$((SECONDS + ${BUDGET:-530}))
PY=${PYTHON:-python3}
# stage and selftest_ladder
# shellcheck source=bench/device_lib.sh
source bench/device_lib.sh
# The tiled attention first: its cubins are committed, so it needs no refdpo binary. Its JIT
# tests (which the interpreter runs on the CPU) only where the call is the flash check alone.
if [ "$DEVICE" = cuda ]; then
  echo "card: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)" >> "$OUT/stages.txt"
  if [ -n "$FLASH_ONLY" ]; then
    stage flash "$([ -n "${FLASH_ARGS[*]}" ] && echo 240 || echo 180)" "$PY" src/model/fused/triton/device_check.py --out "$OUT" "${FLASH_ARGS[@]}"
    exit 0
  fi
  [ -n "$NO_FLASH" ] || stage flash 120 "$PY" src/model/fused/triton/device_check.py --out "$OUT" --skip-tests
fi
if [ "$DEVICE" = cuda ]; then
  # only the TRL and PEFT peers need the wheels: a failed install costs those setups, not the call
  if [ -d .whl ]; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl >> "$OUT/log.txt" 2>&1; then
      export PYTHONPATH=/tmp/site
    else
      echo "wheels not installed (log.txt): the TRL and PEFT setups will fail" >> "$OUT/stages.txt"
    fi
  fi
  NV=$("$PY" -c "import nvidia,os;print(next(p for p in nvidia.__path__ if os.path.isdir(p+'/cu13/lib')))")
  export LD_LIBRARY_PATH=$NV/cu13/lib:${LD_LIBRARY_PATH:-}
  "$PY" -c "import lzma,shutil;shutil.copyfileobj(lzma.open('.gpu/refdpo.xz'),open('/tmp/refdpo','wb'))" \
    && chmod +x /tmp/refdpo || exit 1
  export REFDPO=/tmp/refdpo
fi
export REFDPO=${REFDPO:?set REFDPO to the refdpo command}
# The selftest with the fused ops, then without the kernels that failed, then with the composed
# ops (bench/device_lib.sh). When every rung fails the benchmarks still run, with the composed
# ops, marked unverified: the peers' figures need no refdpo.
selftest_ladder
case $? in
  1) echo "ops: REFDPO_FUSED=0, unverified (every selftest rung failed): refdpo's figures are not results" | tee -a "$OUT/stages.txt" ;;
esac
[ -z "$PRE_MODELS" ] ||
  stage precompute 200 "$PY" bench/gpu.py precompute --device "$DEVICE" --models "$PRE_MODELS" "${SIZE[@]}" "${EXTRA[@]}"
stage train 270 "$PY" bench/gpu.py train --device "$DEVICE" --models "$TRAIN_MODELS" --batch 8 "${SIZE[@]}" "${EXTRA[@]}"
ls -la "$OUT"

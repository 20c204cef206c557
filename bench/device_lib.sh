# The device call's shared steps, sourced by bench/device.sh (and by its test,
# tests/integration/device_script.rs). Needs OUT (the output folder), REFDPO (the refdpo
# command) and DEVICE.

stage() { # name, seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT/stages.txt"
  return "$rc"
}

# The selftest with refdpo's fused ops (the CUDA default). If a fused kernel's check fails, the
# selftest's report ends with the setting that leaves out the kernels that failed
# (`to run the composed ops in their place: REFDPO_FUSED=-a,-b`): the selftest runs again with
# it exported and, if it passes, the benchmarks run with it, every other kernel still fused.
# When no kernel is named, each pair's prompt computed once (new, not yet run on a GPU) is the
# first suspect: the fused ops are checked again with every sequence whole
# (REFDPO_SHARE_PROMPTS=0), and benchmarked so if that passes. Else the composed ops
# (REFDPO_FUSED=0) are checked and, if they pass, benchmarked instead. $OUT/ops.txt says which.
# Returns 1 when no rung passed.
selftest_ladder() {
  # shellcheck disable=SC2086 # REFDPO may be a command with arguments (cargo run …)
  stage selftest 150 $REFDPO selftest --device "$DEVICE" && return 0
  local without
  without=$(grep -oE '^to run the composed ops in their place: REFDPO_FUSED=[-a-z0-9,]+$' \
    "$OUT/selftest.log" | sed 's/.*: //' | tail -n 1)
  if [ -n "$without" ]; then
    echo "selftest failed in fused kernels: trying without them ($without)" >&2
    export "${without?}"
    echo "$without" > "$OUT/ops.txt"
    # shellcheck disable=SC2086
    stage selftest-without 120 $REFDPO selftest --device "$DEVICE" && return 0
  else
    echo "selftest failed with no kernel named: trying every sequence whole (REFDPO_SHARE_PROMPTS=0)" >&2
    export REFDPO_SHARE_PROMPTS=0
    echo "REFDPO_SHARE_PROMPTS=0" > "$OUT/ops.txt"
    # shellcheck disable=SC2086
    stage selftest-whole 120 $REFDPO selftest --device "$DEVICE" && return 0
    unset REFDPO_SHARE_PROMPTS
  fi
  echo "selftest failed with the fused ops: trying the composed ones (REFDPO_FUSED=0)" >&2
  export REFDPO_FUSED=0
  echo "REFDPO_FUSED=0" > "$OUT/ops.txt"
  # shellcheck disable=SC2086
  stage selftest-composed 120 $REFDPO selftest --device "$DEVICE"
}

# The device call's shared steps, sourced by bench/device.sh (and by its test,
# tests/integration/device_script.rs). Needs OUT (the output folder), REFDPO (the refdpo
# command) and DEVICE; END (a value of $SECONDS) is the call's deadline, when set.
#
# The device tool returns at most 8 files from $OUT: every stage's output goes into one
# $OUT/log.txt (each stage's own copy stays in $STAGE_LOGS, outside $OUT), and the stage
# lines, the card and the ops chosen into $OUT/stages.txt.
STAGE_LOGS=${STAGE_LOGS:-$(mktemp -d)}

stage() { # name, seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  # each stage's limit is cut to what the call's deadline leaves (15 s kept for the bookkeeping),
  # so the stage ends under its own timeout and its line lands, not under the tool's kill
  if [ -n "${END:-}" ]; then
    local left=$((END - SECONDS - 15))
    if [ "$left" -lt 20 ]; then
      echo "== $name: skipped, no time left before the call's deadline" | tee -a "$OUT/stages.txt"
      return 124
    fi
    [ "$left" -ge "$limit" ] || limit=$left
  fi
  echo "==== $name (limit $limit s)" >> "$OUT/log.txt"
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$STAGE_LOGS/$name.log" | tee -a "$OUT/log.txt"
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
# (REFDPO_FUSED=0) are checked and, if they pass, benchmarked instead. An `ops:` line in
# $OUT/stages.txt says which. A selftest cut off by its time limit is no failing kernel: it
# returns 2 with no rung run (the benchmarks go on with the fused ops). Returns 1 when no rung
# passed.
selftest_ladder() {
  # shellcheck disable=SC2086 # REFDPO may be a command with arguments (cargo run …)
  stage selftest 150 $REFDPO selftest --device "$DEVICE"
  local rc=$?
  [ "$rc" != 0 ] || return 0
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "ops: fused (the selftest was cut off at its limit: unverified)" | tee -a "$OUT/stages.txt"
    return 2
  fi
  local without
  without=$(grep -oE '^to run the composed ops in their place: REFDPO_FUSED=[-a-z0-9,]+$' \
    "$STAGE_LOGS/selftest.log" | sed 's/.*: //' | tail -n 1)
  if [ -n "$without" ]; then
    echo "selftest failed in fused kernels: trying without them ($without)" >&2
    export "${without?}"
    echo "ops: $without" >> "$OUT/stages.txt"
    # shellcheck disable=SC2086
    stage selftest-without 150 $REFDPO selftest --device "$DEVICE" && return 0
  else
    echo "selftest failed with no kernel named: trying every sequence whole (REFDPO_SHARE_PROMPTS=0)" >&2
    export REFDPO_SHARE_PROMPTS=0
    echo "ops: REFDPO_SHARE_PROMPTS=0" >> "$OUT/stages.txt"
    # shellcheck disable=SC2086
    stage selftest-whole 150 $REFDPO selftest --device "$DEVICE" && return 0
    unset REFDPO_SHARE_PROMPTS
  fi
  echo "selftest failed with the fused ops: trying the composed ones (REFDPO_FUSED=0)" >&2
  export REFDPO_FUSED=0
  echo "ops: REFDPO_FUSED=0" >> "$OUT/stages.txt"
  # shellcheck disable=SC2086
  stage selftest-composed 150 $REFDPO selftest --device "$DEVICE"
}

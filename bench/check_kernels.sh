#!/usr/bin/env bash
# Compiles the fused kernels for sm_${CUDA_COMPUTE_CAP:-90} with ptxas's report (`nvcc -cubin
# -Xptxas -v`) and fails if any kernel spills registers. Needs nvcc (the CUDA 13 toolchain:
# `eval "$(../shared/tools/cuda13-toolchain.sh /tmp/cu13 | tail -1)"`), no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
cap=${CUDA_COMPUTE_CAP:-90}
report=$(nvcc -arch="sm_$cap" -O3 -std=c++17 -cubin -Xptxas -v src/model/fused/kernels.cu \
  -o /dev/null 2>&1)
kernels=$(grep -c "Compiling entry function" <<<"$report")
clean=$(grep -c " 0 bytes spill stores, 0 bytes spill loads" <<<"$report")
regs=$(grep -o "Used [0-9]* registers" <<<"$report" | awk '{print $2}' | sort -n | sed -n '1p;$p' | paste -sd-)
echo "sm_$cap: $kernels kernels, $clean without spills, $regs registers per thread"
[ "$kernels" -gt 0 ] && [ "$kernels" -eq "$clean" ]

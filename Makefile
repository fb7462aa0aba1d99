# Topiary: `make setup` once, then `make pipeline`, `make test`, `make bench`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
# Environment defaults (offline, no telemetry...): modules/env.py, the one place for them.
$(foreach kv,$(shell $(PY) -m modules.env),$(eval export $(kv)))

.PHONY: setup pipeline sweep test test-fast lint format bench bench-scale bench-pipeline parity reference-model ui clean \
	gpu-check gpu-wheels bench-moe-groups

setup: $(BIN)/topiary

$(BIN)/topiary: pyproject.toml requirements.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -c requirements.lock -e ".[dev]"
	touch $@

pipeline: setup
	$(BIN)/topiary pipeline --config configs/pipeline.yaml

sweep: setup
	$(BIN)/topiary sweep --config configs/sweep.yaml

test: setup
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python -m benchmarks.bench_methods

# Wall time of `topiary prune embedded` (cold/warm corpus cache) and of `make pipeline` (cold,
# warm, warm with `topiary server start`), each in a fresh process, in a temporary folder.
bench-pipeline: setup
	$(BIN)/python -m benchmarks.bench_pipeline

# Peak RSS of a CPU prune at 12 and 24 blocks (random LLaMA, 6.2 GB at 24; temporary, removed after).
bench-scale: setup
	$(BIN)/python -m benchmarks.bench_scale $(BENCH_SCALE_ARGS)

# Peak RSS of a CPU prune of a random Qwen3-MoE (16 blocks of 64 experts, 3.3 GB, cached under
# .topiary/bench/moe-groups): one expert group at a time against a whole block at a time.
bench-moe-groups: setup
	$(BIN)/python -m benchmarks.bench_moe_groups $(BENCH_MOE_ARGS)

# The reference repositories' own code against Topiary (benchmarks/parity.py); clones are
# given by path and never copied: make parity WANDA_DIR=... SPARSEGPT_DIR=... ADMM_DIR=... GBLM_DIR=...
parity: setup
	$(BIN)/python -m benchmarks.parity --wanda "$(WANDA_DIR)" --sparsegpt "$(SPARSEGPT_DIR)" \
		--admm "$(ADMM_DIR)" --gblm "$(GBLM_DIR)" $(PARITY_ARGS)

# The prepared GPU check (docs/gpu-check.md): the CUDA tests, and 70B-shaped blocks pruned with
# Wanda, SparseGPT and ADMM-Grad against `topiary plan`, reported in $(OUT). No `setup`: a GPU
# machine runs it with its image's python3 (and the wheels of `make gpu-wheels`).
OUT ?= outputs/gpu-check
GPU_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))
gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_PY) -m benchmarks.gpu_check --device cuda --out $(OUT) $(GPU_CHECK_ARGS)

# .whl/: the wheels the GPU image lacks and this checkout's commit, carried with the tree.
gpu-wheels:
	benchmarks/gpu_wheels.sh

reference-model: setup
	$(BIN)/python -m modules.reference.train

ui: setup
	$(BIN)/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db

clean:
	rm -rf .topiary mlflow.db mlruns mlartifacts outputs

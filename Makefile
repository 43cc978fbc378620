# Two entry points: `make test` (the whole suite, what CI runs) and `make demo`.
# Both create .venv when missing or when requirements.txt, constraints.txt or
# pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export PREFECT_HOME := $(CURDIR)/runs/prefect
# Telemetry off unless the environment turns it on (rzenembed/telemetry.py, docs/operations.md).
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export RAY_USAGE_STATS_ENABLED ?= 0
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= true
export HF_HUB_DISABLE_TELEMETRY ?= 1
# A first start migrates a fresh database; on a busy 2-core machine that can pass 20 s.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: test demo lint format bench gpu-check gpu-check-dry-run clean

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel
	$(BIN)/pip install --quiet -r requirements.txt -c constraints.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	mkdir -p $(PREFECT_HOME)
	$(BIN)/python -m pytest -n 2

demo: $(STAMP)
	$(BIN)/python -m flows.demo --config configs/tiny.yaml $(if $(FAMILY),--family $(FAMILY))

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/loss_bench.py

# On a machine with CUDA devices: the driver against the build, training (two NCCL workers
# with two or more GPUs, the gradient all-reduce shown by equal weights), GradCache against
# the plain step (the 2B config's dropout and checkpointing), evaluation on CUDA, two NCCL
# ranks against one and the 2B benchmark against its MFU floor and memory ceiling;
# PASS/FAIL/SKIP per part with figures and what it asserted (docs/PERFORMANCE.md). Every
# part has a timeout and the check an overall deadline: it always exits, killing what it
# started. `make gpu-check-dry-run`: every part's code on CPU plus a planted hung rank,
# which must FAIL as timed out while the rest passes (then it exits 0).
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --json runs/gpu-check.json

gpu-check-dry-run: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --dry-run --plant-hang

clean:
	rm -rf runs .pytest_cache .ruff_cache

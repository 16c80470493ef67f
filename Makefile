# One entry point for people and CI. `make test` and `make demo` install first when needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Exact torch builds for this machine; pyproject.toml states ranges (GPU images carry others).
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-fast demo bench gpu-check lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev,metrics]'
	touch $@

# JOBS pytest-xdist workers (one torch thread each); JOBS=0 runs everything in this process.
JOBS   ?= 2

test: install
	$(BIN)/python -m pytest -q -n $(JOBS) --dist worksteal

test-fast: install
	$(BIN)/python -m pytest -q -n $(JOBS) --dist worksteal -m "not slow"

# The whole chain on the embedded dataset (stage=all: clip -> vae -> unet -> generate and check);
# about 20 minutes on 2 CPU cores. Prints the share of generated images that show their prompt.
demo: install
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python -m ldm_train stage=all $(ARGS)

bench: install
	$(BIN)/python -m benchmarks

# On a GPU machine: throughput, MFU and memory of each stage, and multi-process smoke runs, in one
# table within 5 minutes (ARGS="--budget 600" gives torch.compile more time; ARGS=--dry rehearses
# on the CPU).
gpu-check: install
	$(BIN)/python -m benchmarks.gpu $(ARGS)

lint: install
	$(BIN)/ruff check ldm_train tests benchmarks
	$(BIN)/ruff format --check ldm_train tests benchmarks

format: install
	$(BIN)/ruff format ldm_train tests benchmarks
	$(BIN)/ruff check --fix ldm_train tests benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache outputs multirun wandb
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# One-command entry points. `make train` and `make test` each set up .venv first (idempotent).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data train test test-quick test-gpu test-triton36 lint bench clean

# PyPI's torch is the CUDA build (about 5.7 GB with its CUDA libraries); README "Install" gives the alternatives.
TORCH ?= torch==2.14.1 torchvision==0.29.1
VENV_FLAGS ?=

$(BIN)/sasa: pyproject.toml
	@echo "setting up $(VENV): $(if $(TORCH),$(TORCH),the torch of $(PY)) and sasa[dev] (README: Install)"
	$(PY) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/pip install -q $(TORCH) || $(BIN)/pip install -q "torch>=2.5" "torchvision>=0.20")
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/sasa

# Fashion-MNIST (30 MB) from Debian's package, the default dataset of `sasa train`: needs root and apt-get;
# without them it says so and `sasa train` looks in ~/.cache/sasa or downloads.
data:
	@if [ -d $(FMNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's dataset-fashion-mnist (30 MB) with apt-get"; \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else echo "not installing dataset-fashion-mnist (needs root and apt-get): sasa train will use --data-dir or download"; fi

train: setup data
	$(BIN)/sasa train

# The whole suite on 2 pytest-xdist workers (one torch thread each, tests/conftest.py); TEST_WORKERS=0 runs it in
# one process. test-quick: the tier without the `slow` tests, in one process (about a minute on 2 cores).
# test-gpu: the CUDA correctness tests (tests/test_gpu.py and every other `gpu` test); skipped without CUDA.
TEST_WORKERS ?= 2
test: setup data
	$(BIN)/python -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS))

test-quick: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu

# The Triton tests (interpreter, and the offline sm_90a compile) again under the GPU machines' Triton 3.6, which
# the CUDA build of torch 2.14 (Triton 3.8) does not cover; a CPU-only torch 2.13 keeps that environment small.
T36 := .venv-triton36
$(T36)/ok:
	$(PY) -m venv $(T36)
	$(T36)/bin/pip install -q torch==2.13.0 triton==3.6.0 numpy pytest
	touch $@

test-triton36: $(T36)/ok
	PYTHONPATH=$(CURDIR) $(T36)/bin/python -m pytest -q -p no:cacheprovider tests/test_triton.py

lint: setup
	$(BIN)/ruff check sasa tests tools

bench: setup
	$(BIN)/sasa bench --small

clean:
	rm -rf $(VENV) $(T36) runs .pytest_cache

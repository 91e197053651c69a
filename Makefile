# One-command entry points. `make train` and `make test` each set up .venv first (idempotent).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data train test test-triton36 test-all lint bench clean

$(BIN)/sasa: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1 || $(BIN)/pip install -q "torch>=2.5" "torchvision>=0.20"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/sasa

# Fashion-MNIST from Debian's package when apt is available (the default dataset of `sasa train`).
data:
	@test -d $(FMNIST) || (command -v apt-get >/dev/null && (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
		|| echo "dataset-fashion-mnist not installed: sasa train will try --data-dir or a download")

train: setup data
	$(BIN)/sasa train

test: setup data
	$(BIN)/python -m pytest -q

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

# One-command entry points. `make train` and `make test` each set up .venv first (idempotent).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data train test test-all lint bench clean

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

lint: setup
	$(BIN)/ruff check sasa tests tools

bench: setup
	$(BIN)/sasa bench --small

clean:
	rm -rf $(VENV) runs .pytest_cache

# Set-up and entry points. The venv is created and filled here; torch is pinned to the
# CPU build that lies on this machine's disk before the project (torch>=2.6) is installed.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup test test-slow demo bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

demo: setup
	$(BIN)/python train.py configs/mnist_class_tiny.py --overwrite

bench: setup
	$(BIN)/python bench/attention.py --readme
	$(BIN)/python bench/sampling.py --readme
	$(BIN)/python bench/train.py --readme

clean-venv:
	rm -rf $(VENV)

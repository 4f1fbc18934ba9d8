# The two commands that do all the set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned to the CPU wheel on this machine: an open range asked for before torch is
# installed would pull a multi-GB CUDA build. Override TORCH_SPEC to use your own build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench results clean-venv

$(BIN)/python:
	@command -v $(PY) >/dev/null 2>&1 || { echo "error: $(PY) not found; install Python 3.11 or run: make PY=python3 ..." >&2; exit 2; }
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m tunesmith.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --timeout=900 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# docs/results.md: every recipe trained on the real model and evaluated (hours on 2 CPU cores; resumable).
# RESULTS_ARGS="--recipes ticket-triage-lora --limit 100" narrows it.
results: $(STAMP)
	$(BIN)/python scripts/results.py $(RESULTS_ARGS)

clean-venv:
	rm -rf $(VENV)

# The two commands that do all the set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned to the CPU wheel on this machine: an open range asked for before torch is
# installed would pull a multi-GB CUDA build. Override TORCH_SPEC to use your own build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint format bench bench-venv bench-dpo results clean-venv browser

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

# tests/test_report.py renders report.html in headless Chromium. Install Debian's chromium when no browser is found
# and we may (root, or sudo without a password); otherwise that test skips with the reason (under CI=true it fails).
browser:
	@if [ -n "$$TUNESMITH_CHROMIUM" ] || command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	  || command -v google-chrome >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  echo "installing chromium (apt-get) for the report's browser test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
	    || echo "warning: apt-get could not install chromium; the report browser test will skip (fail under CI=true)" >&2; \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
	  echo "installing chromium (sudo apt-get) for the report's browser test"; \
	  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
	    || echo "warning: apt-get could not install chromium; the report browser test will skip (fail under CI=true)" >&2; \
	else \
	  echo "note: no chromium and no way to install it (not root, no passwordless sudo): the report browser test will skip" >&2; \
	fi

# ruff (rules and why in pyproject.toml): the formatter's layout and a small lint rule set, on the whole tree
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# `make test`: the default suite (under 20 min on 2 cores, the slowest CPU seen included); `make test-long`: the tests
# marked long (real-model llama.cpp and evaluation runs, the rarer architectures, ...); CI (.ci/run) runs both.
test: $(STAMP) browser lint
	@$(BIN)/python -c "import torch, transformers, peft; print('testing with torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
	$(BIN)/python -m pytest -q --timeout=900 -m "not long" tests

test-long: $(STAMP) browser
	$(BIN)/python -m pytest -q --timeout=900 -m long tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# docs/results.md: every recipe trained on the real model and evaluated (hours on 2 CPU cores; resumable).
# RESULTS_ARGS="--recipes ticket-triage-lora --limit 100" narrows it.
results: $(STAMP)
	$(BIN)/python scripts/results.py $(RESULTS_ARGS)

# Training speed against Hugging Face Trainer + peft (sized for under 15 min on 2 idle cores, an estimate from the
# per-step rates in shared/BENCHMARKING.md; bench/RESULTS.md has what was measured),
# then label scoring against model.generate (bench/eval_speed.py; with the fine-tuned model too once `make demo` ran).
# BENCH_ARGS=... passes options to bench/train_speed.py.
bench: $(STAMP)
	$(BIN)/python bench/train_speed.py $(BENCH_ARGS)
	$(BIN)/python bench/eval_speed.py --examples 32 $(if $(wildcard runs/demo-ticket-triage/model),--run runs/demo-ticket-triage)

# A second venv with TRL for bench/dpo_speed.py's baseline (TRL's DPOTrainer), so the project's venv stays without it.
# The same torch wheel first (a bare torch requirement would pull a CUDA build), then the project's transformers
# and peft and the TRL release whose requirements accept them (trl 1.16.0: transformers>=4.56.2, accelerate>=1.10.1,
# datasets>=4.7.0; peft is its optional extra). Re-running does nothing once the stamp exists.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_SPEC ?= transformers==5.23.* peft==0.21.2 trl==1.16.0 accelerate==1.16.0 datasets==4.8.*

$(BENCH_VENV)/bin/python:
	@command -v $(PY) >/dev/null 2>&1 || { echo "error: $(PY) not found; install Python 3.11 or run: make PY=python3 ..." >&2; exit 2; }
	$(PY) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip

$(BENCH_STAMP): $(BENCH_VENV)/bin/python
	$(BENCH_VENV)/bin/python -c "import torch" 2>/dev/null || $(BENCH_VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(BENCH_VENV)/bin/pip install -q $(BENCH_SPEC)
	$(BENCH_VENV)/bin/python -c "import torch, trl; print('bench venv: torch', torch.__version__, 'trl', trl.__version__)"
	@touch $(BENCH_STAMP)

bench-venv: $(BENCH_STAMP)

# DPO training speed against TRL's DPOTrainer (bench/dpo_speed.py; ~10 min on 2 idle cores with its defaults).
# DPO_BENCH_ARGS=... passes options to it (--steps, --repeats, --pairs FILE, --json FILE).
bench-dpo: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python bench/dpo_speed.py $(DPO_BENCH_ARGS)

clean-venv:
	rm -rf $(VENV)

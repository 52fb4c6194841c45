# make run   -> set up .venv (first time) and run the default experiment (depth_vs_width)
# make test  -> set up .venv (first time), lint, type-check and run the fast tests (< 5 min)
# make test-all -> the same with every test (kill/resume, PostgreSQL, families, populations,
#                  exports; what CI runs), printing the 15 slowest
# make lock  -> re-pin requirements.lock (after changing dependencies in pyproject.toml)
# The newest Python >= 3.11 that runs here (pyenv shims that are not active do not); or
# `make PYTHON=/path/to/python3.12 run`.
PYTHON ?= $(shell for p in python3.14 python3.13 python3.12 python3.11 python3; do \
	$$p -c 'import sys; assert sys.version_info >= (3, 11)' >/dev/null 2>&1 && \
	{ echo $$p; break; }; done)
NO_PYTHON := sweeper needs Python >= 3.11 and none runs here (tried python3.14 .. python3.11, \
	python3); install one, or: make PYTHON=/path/to/python3.12 ...
VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: run smoke test test-all lint bench ui lock which-python

$(BIN)/.installed: pyproject.toml requirements.lock
	@test -n "$(PYTHON)" || { echo "$(NO_PYTHON)" >&2; exit 1; }
	@echo "setting up $(VENV) with $$($(PYTHON) -c 'import sys; print(sys.executable, sys.version.split()[0])')" \
		"from requirements.lock (the first time: a few GB, minutes)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install --progress-bar on -r requirements.lock
	@# the project itself, editable (setuptools' note about editable installs silenced)
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

run: $(BIN)/.installed
	$(BIN)/python -m sweeper +experiment=depth_vs_width $(ARGS)

smoke: $(BIN)/.installed
	$(BIN)/python -m sweeper +experiment=smoke $(ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy

# Two pytest workers (pytest-xdist), one test file each at a time, one torch thread each (the
# tests' sweep subprocesses inherit it): most tests wait on a subprocess, so two cores run two.
PYTEST = OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile

test: lint
	$(PYTEST) -m "not slow"

test-all: lint
	$(PYTEST) --durations=15

bench: $(BIN)/.installed
	$(BIN)/python scripts/bench_trial.py $(ARGS)

ui: $(BIN)/.installed
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db

# One lock for every supported Python (uv's universal resolution). uv keeps the versions
# already in requirements.lock unless pyproject.toml rules them out; `make test` then runs
# the tests with exactly these versions (tests/test_setup.py checks that they match).
lock: $(BIN)/.installed
	$(BIN)/uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 \
		--no-annotate --no-header --quiet -o requirements.lock
	sed -i '1i # Pinned versions for every supported Python: made by `make lock`, installed by `make` (see Makefile).' requirements.lock

which-python:  # the interpreter a new .venv would use
	@test -n "$(PYTHON)" || { echo "$(NO_PYTHON)" >&2; exit 1; }
	@echo $(PYTHON)

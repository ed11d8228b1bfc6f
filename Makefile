# mad-search: `make test` sets everything up from nothing and runs the whole suite;
# `make run` runs the default study (python -m mad_search +sweep=layer_patterns).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Tested versions; torch first (a local CPU build on our machines; an unpinned torch pulls CUDA).
CONSTRAINTS := constraints.txt
TORCH := torch==2.13.0

.PHONY: setup test test-fast run run-single lint clean

setup: $(VENV)/.installed

# Last, the official xLSTM package (tests compare our blocks with it; the blocks benchmark times
# it) WITHOUT its dependencies: they would pull a CUDA torch; see requirements/bench.txt.
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) requirements/bench.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" -c $(CONSTRAINTS)
	$(PY) -m pip install --quiet -e ".[dev,mlx]" -c $(CONSTRAINTS)
	$(PY) -m pip install --quiet --no-deps -r requirements/bench.txt -c $(CONSTRAINTS)
	touch $@

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

run: setup
	$(PY) -m mad_search +sweep=layer_patterns

run-single: setup
	$(PY) -m mad_search

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) outputs .pytest_cache

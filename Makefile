# pgvouch: `make demo` runs the proxy in front of a throwaway PostgreSQL;
# `make test` installs everything and runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck pytest bench clean speedups

$(STAMP): pyproject.toml scripts/ensure-system-deps.sh
	bash scripts/ensure-system-deps.sh
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "pgvouch needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The relay's hot modules compiled with mypyc (optional: pgvouch falls back to
# pure Python when they are missing or older than their sources).
SPEEDUPS := proxy/_speedups/manifest.json

$(SPEEDUPS): $(STAMP) $(wildcard proxy/*.py) scripts/build_speedups.py
	$(BIN)/python scripts/build_speedups.py

speedups: $(SPEEDUPS)

install: $(STAMP) $(SPEEDUPS)

demo: install
	$(BIN)/pgvouch demo

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy proxy policies approvals config

pytest: install
	$(BIN)/python -c 'import proxy; print("relay modules compiled:", proxy.SPEEDUPS)'
	$(BIN)/pytest

test: lint typecheck pytest

bench: install
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache proxy/_speedups

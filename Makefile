# The two commands of the README:
#   make demo   sets up .venv if needed, then explains the bundled sample photos (writes ./cnnscope-out)
#   make test   sets up .venv if needed, then runs ruff and the whole test suite
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= requirements/constraints-cpu.txt
OUT ?= cnnscope-out
BIN := $(VENV)/bin
STAMP := $(VENV)/.cnnscope-installed

.PHONY: demo test lint bench setup

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c $(CONSTRAINTS) -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cnnscope demo -o $(OUT)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

test: lint
	@scripts/ensure-chromium
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c $(CONSTRAINTS) -e '.[dev,bench]'
	$(BIN)/python bench/gradcam.py
	$(BIN)/python bench/methods.py
	$(BIN)/python bench/perturbation.py
	$(BIN)/python bench/features.py

# Two commands: `make demo` (set up + run the main pipeline) and `make test` (set up + run the tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP_ARGS ?=
# exact versions (pyproject.toml states the compatible ranges)
CONSTRAINTS := -c constraints.txt
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
BENCH_STAMP := $(VENV)/.installed-bench
ARGS ?=

.PHONY: demo test data install dev lint bench results clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# the demo exports to ONNX and checks the graph in onnxruntime: the onnx extra is part of the main install
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q $(PIP_ARGS) $(CONSTRAINTS) -e '.[onnx]'
	touch $@

$(DEV_STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q $(PIP_ARGS) $(CONSTRAINTS) -e '.[dev]'
	touch $@ $(STAMP)

$(BENCH_STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q $(PIP_ARGS) $(CONSTRAINTS) -e '.[dev,synth]'
	touch $@ $(DEV_STAMP) $(STAMP)

install: $(STAMP)
dev: $(DEV_STAMP)

data:
	@bash scripts/ensure_data.sh

demo: $(STAMP) data
	$(BIN)/hwquant demo $(ARGS)

test: $(DEV_STAMP)
	$(BIN)/python -m pytest

lint: $(DEV_STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.run $(ARGS)

results: $(STAMP)
	$(BIN)/python scripts/readme_results.py

clean:
	rm -rf runs build dist src/*.egg-info .pytest_cache .ruff_cache

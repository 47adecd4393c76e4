# Fresh machine: `make test` creates .venv, installs the CPU build of PyTorch and litevar, runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: install test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/.installed

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_sampling.py --model var-d16 --dtypes bf16 fp32 --batches 8 1 \
		--out benchmarks/results/sampling_cpu_d16.json

clean:
	rm -rf $(VENV) .pytest_cache

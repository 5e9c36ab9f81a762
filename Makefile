# Two commands on a fresh machine: `make demo` (install + quickstart) and `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-all lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m lightning_afterkernel fit --config configs/quickstart.yaml

lint: $(STAMP)
	$(PY) -m ruff check $(wildcard lightning_afterkernel tests scripts benchmarks)

# One BLAS/OpenMP thread per test process: the tests run small problems (and two-process DDP runs), where
# threads only wait on each other, badly so when the cores are shared.
test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest

test-all: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "slow or not slow"

clean:
	rm -rf runs wandb lightning_logs .pytest_cache

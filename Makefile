# `make train` and `make test` work on a fresh clone with only Python >= 3.11 and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/quickstart.yaml
ARGS ?=

.PHONY: train test test-slow bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# One stamp per install flavour; reinstalled when pyproject.toml changes.
$(VENV)/.installed-base: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[test]"
	touch $@ $(VENV)/.installed-base

train: $(VENV)/.installed-base
	$(PY) -m hybrax.train --config $(CONFIG) $(ARGS)

# The suite without the runs marked slow, in two worker processes (pytest-xdist; a test compiles more
# than it computes, so two processes keep both cores busy): under 10 minutes on 2 cores.
# tests/conftest.py lists what moved to slow. CI runs both. GPU memory is not preallocated, so the
# workers can share one accelerator.
test: $(VENV)/.installed-test
	XLA_PYTHON_CLIENT_PREALLOCATE=false $(PY) -m pytest -q -m "not slow" -n 2 $(ARGS)

# The slow runs, in two worker processes: 54 minutes here (520 tests, 2 x 6 GB), where CI's single
# process took 73 (2026-12-07: with the fast suite, 83 of CI's 90 minutes).
test-slow: $(VENV)/.installed-test
	XLA_PYTHON_CLIENT_PREALLOCATE=false $(PY) -m pytest -q -m slow -n 2 $(ARGS)

bench: $(VENV)/.installed-base
	$(PY) experiments/bench/train_step.py $(ARGS)

clean:
	rm -rf $(VENV) runs

# Every target works on a fresh machine with nothing but Python: it creates .venv,
# installs the tested torch first (a bare `torch` requirement would pull a multi-GB
# CUDA build), then the package with its dev extra. Re-running skips what is installed.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m disco_ds.demo

bench: $(STAMP)
	$(PY) benchmarks/bench_orthogonalize.py
	$(PY) benchmarks/bench_norm_gpt.py
	$(PY) benchmarks/bench_zero_step.py --quick

clean:
	rm -rf $(VENV) build *.egg-info

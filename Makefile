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

# The test suite, then the README's first command: CI runs both.
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)
	$(MAKE) demo

# The main job on this machine, nothing to download: shards from the standard library's own
# source, 2 ranks under the deepspeed launcher (ZeRO-2, the tiny recipe), export, load, sample.
DEMO_DATA ?= data/stdlib-bytes
DEMO_RUN ?= runs/demo
DEMO_ARGS ?=
demo: $(STAMP)
	$(PY) -m disco_ds prepare --input "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" \
		--glob '*.py' --exclude site-packages --max-bytes 8MB --tokenizer byte --out $(DEMO_DATA)
	rm -rf $(DEMO_RUN)
	$(VENV)/bin/deepspeed --num_gpus 2 --master_port 29600 --module disco_ds train recipes/tiny.yaml \
		data.path=$(DEMO_DATA) train.run_dir=$(DEMO_RUN) $(DEMO_ARGS)
	$(PY) -m disco_ds export $(DEMO_RUN) $(DEMO_RUN)/hf --dtype float32 --force
	$(PY) -m disco_ds.demo $(DEMO_RUN)/hf

bench: $(STAMP)
	$(PY) benchmarks/bench_orthogonalize.py
	$(PY) benchmarks/bench_norm_gpt.py
	$(PY) benchmarks/bench_zero_step.py --quick
	$(PY) benchmarks/bench_tp.py

clean:
	rm -rf $(VENV) build *.egg-info

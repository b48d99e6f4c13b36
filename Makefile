# Every target works on a fresh machine with nothing but Python: it creates .venv,
# installs the tested torch first (a bare `torch` requirement would pull a multi-GB
# CUDA build), then the package with its dev extra, every version pinned by
# constraints.txt (what the suite last passed with). Re-running skips what is installed.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# The model, optimizer and Trainer tests: what test-latest and test-oldest run.
COMPAT_TESTS ?= tests/test_norm_gpt.py tests/test_norm_gpt_contract.py tests/test_newton_schulz.py \
	tests/test_norms.py tests/test_scion.py tests/test_param_groups.py tests/test_zero.py tests/test_hf.py
VERSIONS := import importlib.metadata as m; print(" ".join(f"{p}=={m.version(p)}" for p in \
	("torch", "deepspeed", "transformers", "accelerate", "safetensors", "tokenizers", "wandb", "numpy")))

.PHONY: install test demo bench clean constraints test-latest test-oldest gpu-check

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install --quiet -c constraints.txt "$(TORCH)"
	$(PIP) install --quiet -c constraints.txt -e ".[dev]"
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

# The GPU acceptance run (benchmarks/gpu_check.py): on the GPUs present every case trains, resumes,
# exports and loads, plus throughput and Newton–Schulz TFLOP/s; without a GPU it prints its plan.
# No $(STAMP) prerequisite: on an offline GPU machine run it with that machine's Python
# (make gpu-check PY=python3 GPU_CHECK_ARGS='--out results/gpu_check.md').
GPU_CHECK_ARGS ?=
gpu-check:
	$(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_orthogonalize.py
	$(PY) benchmarks/bench_norm_gpt.py
	$(PY) benchmarks/bench_zero_step.py --quick
	$(PY) benchmarks/bench_tp.py
	$(PY) benchmarks/bench_pipeline_step.py

# Refresh constraints.txt from a fresh resolve of pyproject.toml (newest releases), after which
# `make test` must pass before the new pins are committed.
constraints:
	rm -rf .venv-constraints
	$(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/python -m pip install --quiet --upgrade pip
	.venv-constraints/bin/python -m pip install --quiet "$(TORCH)"
	.venv-constraints/bin/python -m pip install --quiet -e ".[dev]"
	{ echo "# Exact versions the suite last passed with (make test installs with them: pip -c)."; \
	  echo "# Refresh with \`make constraints\`, then \`make test\`, then commit; see the README."; \
	  .venv-constraints/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt
	rm -rf .venv-constraints
	@echo "constraints.txt refreshed; run make test before committing it"

# The newest releases pyproject.toml admits (no constraints) and the oldest it claims (every `>=`
# pinned, tools/lowest_requirements.py): each in its own fresh venv, model + optimizer + Trainer tests.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install --quiet --upgrade pip
	.venv-latest/bin/python -m pip install --quiet "$(TORCH)"
	.venv-latest/bin/python -m pip install --quiet -e ".[dev]"
	.venv-latest/bin/python -c '$(VERSIONS)'
	.venv-latest/bin/python -m pytest $(COMPAT_TESTS) $(PYTEST_ARGS)
	.venv-latest/bin/python -c '$(VERSIONS)'

test-oldest:
	rm -rf .venv-oldest
	$(PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install --quiet --upgrade pip
	$(PYTHON) tools/lowest_requirements.py > .venv-oldest/constraints.txt
	.venv-oldest/bin/python -m pip install --quiet -c .venv-oldest/constraints.txt -e ".[dev]"
	.venv-oldest/bin/python -c '$(VERSIONS)'
	.venv-oldest/bin/python -m pytest $(COMPAT_TESTS) $(PYTEST_ARGS)
	.venv-oldest/bin/python -c '$(VERSIONS)'

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest build *.egg-info

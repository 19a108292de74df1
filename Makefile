# Entry points. Each target bootstraps uv (python3 -m pip install uv) when it is missing and
# syncs the locked environment into .venv/ first.
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
VENV_PYTHON := .venv/bin/python
ARGS ?=
# Write .pyc files: without them every process recompiles torch and lightning (~20 s).
export PYTHONDONTWRITEBYTECODE :=

.PHONY: install train test test-slow test-gpu evaluate explain export sweep benchmark benchmark-gpu lock clean

install: .venv/.ptame-synced

.venv/.ptame-synced: pyproject.toml uv.lock
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	UV_COMPILE_BYTECODE=1 $(UV) sync --locked
	@touch $@

train: install
	$(VENV_PYTHON) train.py $(ARGS)

evaluate: install
	$(VENV_PYTHON) evaluate.py $(ARGS)

explain: install
	$(VENV_PYTHON) explain.py $(ARGS)

export: install
	$(VENV_PYTHON) export.py $(ARGS)

sweep: install
	$(VENV_PYTHON) sweep.py $(ARGS)

test: install
	$(VENV_PYTHON) -m pytest $(ARGS)

test-slow: install
	$(VENV_PYTHON) -m pytest -m "slow" $(ARGS)

test-gpu: install
	$(VENV_PYTHON) -m pytest -m "gpu" $(ARGS)

benchmark: install
	$(VENV_PYTHON) benchmarks/train_step.py $(ARGS)

# every GPU benchmark in one call, with a summary table (benchmarks/gpu_suite.py)
benchmark-gpu: install
	$(VENV_PYTHON) benchmarks/gpu_suite.py $(ARGS)

lock:
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) lock

clean:
	rm -rf .venv outputs .pytest_cache

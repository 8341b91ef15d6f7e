# Two commands for a newcomer: `make demo` and `make test`. Each creates .venv when missing,
# installs torch first (so pip never pulls a multi-gigabyte CUDA build for a CPU machine),
# then preftune with its dev extras, every package at the version requirements.lock pins; both
# are quick once everything is installed. `make test` lints (ruff, configured in pyproject.toml)
# before it tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.preftune-installed
LOCK   := requirements.lock
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
PIP_QUIET := -q --disable-pip-version-check

.PHONY: demo test test-all test-latest lint lock install check-lock clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# A missing or damaged lock stops make in one line (make's own error line), before anything is
# installed: never an unpinned install. Expanded only where an install is about to happen.
lock_problem = $(shell $(PYTHON) tools/lock.py check $(LOCK) 2>&1)
check_lock = $(if $(lock_problem),$(error $(lock_problem)))

check-lock:
	$(check_lock)

# Reached only when the lock is missing: that one line, not make's "no rule to make target".
$(LOCK):
	$(check_lock)

$(STAMP): pyproject.toml $(LOCK) | $(PY)
	$(check_lock)
	$(PY) -m pip install $(PIP_QUIET) -c $(LOCK) torch==2.13.0 $(TORCH_PIP_ARGS)
	$(PY) -m pip install $(PIP_QUIET) -c $(LOCK) -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/preftune demo --out runs/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks tools

# The fast tier: every test that neither launches processes, compiles, profiles nor runs TRL side
# by side (those are marked `full`). Minutes on 2 cores. The suite runs as on a processor without
# bf16 units (tests/conftest.py).
test: lint
	$(PY) -m pytest -x -q -m "not full"

# Everything (what CI runs): the fast tier and the full one, then the tests marked fp32_exact
# again as on a CPU with AMX, where train.bf16 auto must keep them in fp32.
test-all: lint
	$(PY) -m pytest -x -q
	@echo "The fp32_exact tests again, as on a CPU with bf16 units (PREFTUNE_CPU_BF16_UNITS=1):"
	PREFTUNE_CPU_BF16_UNITS=1 $(PY) -m pytest -x -q -m fp32_exact

# The fast tier against the newest releases that pyproject.toml's ranges allow (no lock), in a
# separate environment: what `pip install preftune` gives a user next month. Not run by CI. torch
# stays the build installed first (a constraint): an eager upgrade would fetch PyPI's newest torch,
# a multi-gigabyte CUDA build, onto a CPU machine.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install $(PIP_QUIET) torch==2.13.0 $(TORCH_PIP_ARGS)
	.venv-latest/bin/python -c "import torch; print('torch==' + torch.__version__)" > .venv-latest/torch-constraint.txt
	.venv-latest/bin/python -m pip install $(PIP_QUIET) --upgrade --upgrade-strategy eager -c .venv-latest/torch-constraint.txt -e '.[dev]'
	.venv-latest/bin/python -m pip list --format=freeze | grep -iE '^(torch|transformers|peft|accelerate|datasets|tokenizers|trl)=='
	.venv-latest/bin/python -m pytest -x -q -m "not full"

# Regenerate the lock from pyproject.toml's ranges, deliberately, in a fresh environment; then
# run `make test-all` on it before committing it.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install $(PIP_QUIET) torch==2.13.0 $(TORCH_PIP_ARGS)
	.venv-lock/bin/python -m pip install $(PIP_QUIET) -e '.[dev]'
	.venv-lock/bin/python -m pip freeze --exclude-editable | $(PYTHON) tools/lock.py write $(LOCK)
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) .venv-latest .venv-lock build src/*.egg-info .pytest_cache

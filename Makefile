# Two commands for a newcomer: `make demo` and `make test`. Each creates .venv when missing,
# installs torch first (so pip never pulls a multi-gigabyte CUDA build for a CPU machine),
# then preftune with its dev extras; both are quick once everything is installed. `make test`
# lints (ruff, configured in pyproject.toml) before it tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.preftune-installed
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=

.PHONY: demo test install clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0 $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/preftune demo --out runs/demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -x -q

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache

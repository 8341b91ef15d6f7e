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

# The suite runs as on a processor without bf16 units (tests/conftest.py); the tests marked
# fp32_exact then run again as on a CPU with AMX, where train.bf16 auto must keep them in fp32.
test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -x -q
	@echo "The fp32_exact tests again, as on a CPU with bf16 units (PREFTUNE_CPU_BF16_UNITS=1):"
	PREFTUNE_CPU_BF16_UNITS=1 $(PY) -m pytest -x -q -m fp32_exact

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache

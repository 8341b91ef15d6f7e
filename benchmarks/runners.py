"""Every benchmark run by name, and the process bench.py starts for them (``python -m benchmarks.runners ...``).

The registry sits above the modules that hold the runs: run_preftune (the preftune variants),
run_trl (TRL's runs) and sweep (a beta sweep against three TRL runs, which uses both). None of them
imports this module, so the benchmarks have no import circle (tests/test_layers.py checks it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import run_preftune, run_trl, sweep
from benchmarks.common import TRL_RUNS, VARIANTS, Settings, child_main

Runner = Callable[[str, Settings, Path, Path], dict[str, Any]]

#: Run name -> (name, settings, fixtures folder, work folder) -> its JSON record.
RUNNERS: dict[str, Runner] = {
    **dict.fromkeys(VARIANTS, run_preftune.run_one),
    **dict.fromkeys(TRL_RUNS, run_trl.run),
    "sweep": lambda name, *args: sweep.run_preftune_sweep(*args),
    "trl-sweep": lambda name, *args: sweep.run_trl_sweep(*args),
    "trl-sweep-value": lambda name, *args: sweep.run_trl_value(*args),
}


def run_any(name: str, settings: Settings, fixtures: Path, workdir: Path) -> dict[str, Any]:
    """The run called ``name`` (under ``--smoke`` one process runs several)."""
    return RUNNERS[name](name, settings, fixtures, workdir)


if __name__ == "__main__":
    child_main(run_any, __doc__)

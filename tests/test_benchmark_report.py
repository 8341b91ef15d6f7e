"""benchmarks/report.py: rows from different machines are never compared."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO


@pytest.fixture()
def report():  # noqa: ANN201
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks import report
    finally:
        sys.path.remove(str(REPO))
    return report


def _row(run: str, cpu: str, amx: bool) -> dict:
    flags = {"avx2": True, "avx512f": True, "avx512_bf16": amx, "amx_bf16": amx, "amx_tile": amx}
    return {"run": run, "framework": "trl" if run.startswith("trl") else "preftune", "tokens_per_s": 10.0, "peak_rss_bytes": 1e9,
            "flops_per_s": 1e9, "utilization": 0.5, "first_loss": 0.69, "final_loss": 0.68,
            "machine": {"cpu": cpu, "cpu_flags": flags, "cores": 2, "torch": "2.13.0+cpu"}}


def test_rows_from_different_processors_are_refused(report) -> None:  # noqa: ANN001
    same = [_row("prefix", "Intel Xeon", False), _row("trl", "Intel Xeon", False)]
    assert "prefix" in report.table(same) and report.check_one_machine(same) == "Intel Xeon [avx2,avx512f] x2 torch 2.13.0+cpu"
    mixed = [_row("prefix", "Intel Xeon", True), _row("trl", "Intel Xeon", False)]
    with pytest.raises(report.MixedMachines, match="amx_bf16.*prefix.*; .*trl"):
        report.table(mixed)

"""benchmarks/precision.py in smoke mode: the two smallest Llamas, one timed step each in fp32 and
under bf16 autocast, a table row and a JSON row per size, and the crossover line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import REPO, run_python

pytestmark = pytest.mark.full  # launches processes, compiles or runs TRL: the full tier


@pytest.mark.slow
def test_precision_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "precision.jsonl"
    done = run_python("-m", "benchmarks.precision", "--smoke", "--json", str(out), cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["size"] for r in rows] == ["0.18m", "1m"]
    assert 150_000 < rows[0]["params"] < 210_000 and rows[0]["params"] < rows[1]["params"]  # the demo model first
    for r in rows:
        assert r["fp32_seconds"] > 0 and r["bf16_seconds"] > 0 and r["bf16_speedup"] == pytest.approx(r["fp32_seconds"] / r["bf16_seconds"])
        assert len(r["fp32_step_seconds"]) == len(r["bf16_step_seconds"]) == 1 and r["smoke"] is True
        assert r["machine"]["cpu"] and r["machine"]["cores"] >= 1 and r["machine"]["torch"]  # rows name their processor
        assert r["threads"] == 2 and r["batch_size"] == 8
    table = [line for line in done.stdout.splitlines() if re.match(r"(0\.18m|1m)\s+[\d,]+\s+[\d.]+\s+[\d.]+\s+[\d.]+x", line)]
    assert len(table) == 2, done.stdout
    assert "processor:" in done.stdout and "load average" in done.stdout
    assert re.search(r"^crossover: (bf16 faster from|none here)", done.stdout, re.M), done.stdout

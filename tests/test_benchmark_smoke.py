"""The benchmark's smoke mode, as CI runs it: every run for 2 steps, so the benchmark cannot rot."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def test_smoke_benchmark_runs_everything_and_matches_trl(tmp_path: Path) -> None:
    pytest.importorskip("trl", reason="the benchmark compares with TRL (the `bench` extra)")
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks.common import SMOKE_SKIP, TRL_RUNS, VARIANTS
    finally:
        sys.path.remove(str(REPO))

    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--smoke", "--fixtures", str(tmp_path / "fixtures"), "--workdir", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = {r["run"]: r for r in (json.loads(line) for line in done.stdout.splitlines() if line.startswith("{"))}
    assert set(records) == (set(VARIANTS) - set(SMOKE_SKIP)) | set(TRL_RUNS)
    assert len({json.dumps(r["machine"]["cpu_flags"], sort_keys=True) for r in records.values()}) == 1  # the processor, per row
    assert "bf16 vs prefix: step-1 logps/chosen differ by" in done.stdout
    for name, r in records.items():
        for key in ("tokens_per_s", "peak_rss_bytes", "flops_per_s", "utilization", "first_loss", "final_loss"):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, (name, key, r[key])
        assert len(r["losses"]) == 2, name
    # Policy and reference start equal: every first loss is log 2, whatever the batch.
    assert records["trl"]["first_loss"] == pytest.approx(math.log(2), abs=1e-6)
    # The same batches in the same order: preftune's losses (plain, and prefix sharing) are TRL's,
    # also after an update, where a wrong gradient or a wrong log-prob would show.
    for ours in ("plain", "parity"):
        for theirs in ("trl", "trl-malloc"):
            assert records[ours]["first_loss"] == pytest.approx(records[theirs]["first_loss"], abs=1e-4)
            assert records[ours]["losses"] == pytest.approx(records[theirs]["losses"], abs=1e-4), (ours, theirs)
            assert records[ours]["per_step/logps/chosen"] == pytest.approx(records[theirs]["per_step/logps/chosen"], rel=1e-5)
    assert abs(records["trl"]["final_loss"] - math.log(2)) > 1e-4  # the second step saw a trained policy
    assert records["cache-warm"]["cache_warm"] is True and records["cache-cold"]["cache_warm"] is False
    assert "plain vs trl" in done.stdout and "FAIL" not in done.stdout

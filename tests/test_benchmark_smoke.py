"""The benchmark's smoke mode, as CI runs it: every run for 2 steps, so the benchmark cannot rot."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_python

pytestmark = pytest.mark.full  # launches processes, compiles or runs TRL: the full tier


def test_smoke_benchmark_runs_everything_and_matches_trl(tmp_path: Path) -> None:
    pytest.importorskip("trl", reason="the benchmark compares with TRL (the `bench` extra)")
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks.common import SMOKE_SKIP, SWEEP_RUNS, TRL_RUNS, VARIANTS
    finally:
        sys.path.remove(str(REPO))

    done = run_python("-m", "benchmarks.bench", "--smoke", "--fixtures", str(tmp_path / "fixtures"), "--workdir", str(tmp_path / "work"),
                      cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = {r["run"]: r for r in (json.loads(line) for line in done.stdout.splitlines() if line.startswith("{"))}
    assert set(records) == (set(VARIANTS) - set(SMOKE_SKIP)) | set(TRL_RUNS) | set(SWEEP_RUNS)
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
    check_sweep_rows(records, done.stdout)


def check_sweep_rows(records: dict[str, dict], stdout: str) -> None:
    """The beta sweep (one reference pass) and TRL's three runs: same data, same steps, every value trained."""
    ours, theirs = records["sweep"]["sweep"], records["trl-sweep"]["sweep"]
    assert ours["reference_passes"] == 1 and ours["reference_pass_seconds"] > 0
    assert [v["reference_cache"]["warm"] for v in ours["per_value"]] == [False, True, True]
    assert [v["beta"] for v in ours["per_value"]] == [v["beta"] for v in theirs["per_value"]] == [0.05, 0.1, 0.2]
    # each value trained its own policy: the losses after one update differ with beta, on both sides
    for side in (ours, theirs):
        assert len({v["losses"][1] for v in side["per_value"]}) == 3
        assert all(len(v["losses"]) == 2 for v in side["per_value"])
    assert ours["total_seconds"] == pytest.approx(ours["reference_pass_seconds"] + sum(ours["cache_read_seconds"])
                                                  + sum(v["train_seconds"] for v in ours["per_value"]))
    assert theirs["total_seconds"] == pytest.approx(sum(v["train_seconds"] for v in theirs["per_value"]))
    # the same pairs on both sides: 3 x (every pair of the sweep's data once)
    assert records["sweep"]["real_tokens"] == records["trl-sweep"]["real_tokens"] == 3 * ours["reference_pass_tokens"]
    # the sweep does not change results: its beta=0.1 losses are a single run's on the same batches
    same = ours["same_as_single_run"]
    assert same["max_loss_diff"] <= 1e-5 and len(same["single_losses"]) == 2
    # the policies start at the reference, and both sides train the same pairs with beta 0.1 first at log 2
    assert records["sweep"]["first_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert records["trl-sweep"]["first_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert "sweep vs trl-sweep:" in stdout and "faster" in stdout


def test_sweep_cost_prints_the_ratio_and_fails_when_the_sweep_changed_results() -> None:
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks.sweep import sweep_cost
    finally:
        sys.path.remove(str(REPO))

    def value(beta: float, seconds: float) -> dict:
        return {"beta": beta, "train_seconds": seconds, "tokens_per_s": 100.0}

    ours = {"run": "sweep", "real_tokens": 300, "sweep": {
        "betas": [0.05, 0.1], "steps_per_value": 22, "pairs": 176, "total_seconds": 30.0, "reference_pass_seconds": 10.0,
        "cache_read_seconds": [0.0], "wall_seconds": 40.0, "per_value": [value(0.05, 10.0), value(0.1, 10.0)],
        "same_as_single_run": {"beta": 0.1, "max_loss_diff": 0.0, "bound": 1e-5}}}
    theirs = {"run": "trl-sweep", "real_tokens": 300, "sweep": {
        "processes": 2, "total_seconds": 75.0, "wall_seconds": 100.0, "per_value": [value(0.05, 37.5), value(0.1, 37.5)]}}
    lines, same = sweep_cost([ours, theirs])
    assert same and lines[-1] == "sweep vs trl-sweep: 30.0 s against 75.0 s: 2.50x faster (wall after imports 2.50x)"
    ours["sweep"]["same_as_single_run"]["max_loss_diff"] = 2e-5
    lines, same = sweep_cost([ours, theirs])
    assert not same and any("FAIL" in line for line in lines)

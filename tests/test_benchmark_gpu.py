"""benchmarks/gpu.py: the GPU script runs end to end on a CPU at tiny size (so it is known to work
before a GPU is lent), and says plainly when GPU numbers are missing."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, run_python

pytestmark = pytest.mark.full  # launches processes, compiles or runs TRL: the full tier


def _gpu(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return run_python("-m", "benchmarks.gpu", *args, "--workdir", str(tmp_path / "gpu"), cwd=REPO)


@pytest.mark.slow
def test_gpu_script_tiny_on_cpu(tmp_path: Path) -> None:
    pytest.importorskip("trl", reason="the GPU script compares with TRL (the `bench` extra)")
    done = _gpu("--tiny", "--device", "cpu", tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = {r["run"]: r for r in (json.loads(line) for line in done.stdout.splitlines() if line.startswith("{"))}
    assert set(records) == {"preftune", "preftune-cache", "trl", "attention"}
    for name in ("preftune", "preftune-cache", "trl"):
        r = records[name]
        assert r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0 and 0 < r["mfu_measured"] < 10, (name, r)
        assert r["losses"][0] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at the start
    assert records["preftune"]["reference"]["layout"] == "prefix_shared"
    assert records["preftune-cache"]["reference"]["train_cache"]["warm"] is False
    assert any("liger" in note for note in records["trl"]["notes"])
    attention = records["attention"]
    assert attention["sdpa_block_mask_s"] > 0 and attention["sdpa_two_plain_rows_s"] > 0
    assert "GPU numbers missing: no GPU was lent" in done.stdout


def test_gpu_script_without_cuda_says_the_numbers_are_missing(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    done = _gpu(tmp_path=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("GPU numbers missing: no GPU was lent"), done.stdout + done.stderr

"""benchmarks/prep.py at tiny sizes: HH-shaped synthetic data, the tokenized cache cold then warm,
one JSON line per measurement and the linearity summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, SHARED_DATA, run_python

pytestmark = pytest.mark.full  # launches processes, compiles or runs TRL: the full tier


@pytest.mark.slow
def test_prep_benchmark_smoke(tmp_path: Path) -> None:
    if not (SHARED_DATA / "hh-rlhf").is_dir():
        pytest.skip("the HH-RLHF sample (../shared/data/hh-rlhf) is not here")
    done = run_python("-m", "benchmarks.prep", "--sizes", "50,100", "--kinds", "preftune-cold,preftune-warm", "--workdir", str(tmp_path),
                      cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(r["kind"], r["records"]) for r in rows] == [("preftune-cold", 50), ("preftune-warm", 50),
                                                         ("preftune-cold", 100), ("preftune-warm", 100)]
    assert all(r["kept"] == r["records"] and r["seconds"] > 0 and r["peak_rss_bytes"] > 0 for r in rows)
    assert all(r["machine"]["cores"] >= 1 and r["machine"]["cpu"] for r in rows)  # rows name their processor
    assert "preftune-warm: seconds per record at the largest size" in done.stdout
    first = json.loads((tmp_path / "hh-synthetic-50.jsonl").read_text().splitlines()[0])
    assert first["prompt"].startswith("\n\nHuman:") and first["prompt"].endswith("\n\nAssistant:")

"""stages/lifecycle.py: a run folder belongs to one run; a finished run is never overwritten by accident."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import dpo_config, weights
from preftune.errors import PreftuneError
from preftune.stages.dpo import run as run_dpo


def test_a_finished_run_is_not_overwritten_by_accident(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    common = ["--train.max_steps=2", "--train.save_every=1", "--train.eval_every=null"]
    run_dpo(dpo_config(tiny_model_dir, preference_files[0], None, out, *common))
    before = weights(out / "final")
    with pytest.raises(PreftuneError, match=r"already holds a run \(finished at step 2.*train.resume_from=latest.*train.overwrite=true"):
        run_dpo(dpo_config(tiny_model_dir, preference_files[0], None, out, "--train.max_steps=5", "--train.lr=1e-2"))
    after = weights(out / "final")
    assert after.keys() == before.keys() and all((after[k] == before[k]).all() for k in before)  # untouched
    assert json.loads((out / "status.json").read_text())["status"] == "finished"
    # overwrite replaces the whole run: no checkpoint of the old one is left to resume from
    run_dpo(dpo_config(tiny_model_dir, preference_files[0], None, out, "--train.max_steps=1", "--train.save_every=null",
                       "--train.eval_every=null", "--train.overwrite=true"))
    assert not (out / "checkpoints").exists()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_two_runs_cannot_share_a_folder(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])  # a live process that is not preftune
    try:
        (out / "status.json").write_text(json.dumps({"status": "running", "pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(PreftuneError, match=f"another preftune run \\(pid {sleeper.pid}\\) is writing"):
            run_dpo(dpo_config(tiny_model_dir, preference_files[0], None, out, "--train.max_steps=1", "--train.overwrite=true"))
    finally:
        sleeper.kill()
        sleeper.wait()
    # the process is gone: the folder holds a killed run, which resume or overwrite may take over
    run_dpo(dpo_config(tiny_model_dir, preference_files[0], None, out, "--train.max_steps=1", "--train.overwrite=true",
                       "--train.save_every=null", "--train.eval_every=null"))
    assert json.loads((out / "status.json").read_text())["status"] == "finished"


def test_an_output_folder_that_is_a_file_is_a_clear_error(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    path = tmp_path / "a-file"
    path.write_text("x")
    with pytest.raises(PreftuneError, match="is a file, not a folder"):
        run_dpo(dpo_config(tiny_model_dir, preference_files[0], None, path, "--train.max_steps=1"))
    assert os.path.isfile(path)

"""A run deletes or replaces only what a preftune run wrote, resumes only what it started, and a run
that stops before training leaves its folder byte for byte as it found it (system/runfolder.py)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from conftest import DPO_TINY
from preftune.cli.main import main
from preftune.models.tiny import synthetic_preferences


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links as links) with its bytes' digest."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = "link:" + str(path.readlink())
        elif path.is_file():
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[rel] = "dir"
    return found


def dpo(model: Path, data: Path, out: Path, *overrides: str) -> list[str]:
    return ["dpo", str(DPO_TINY), f"--model.path={model}", f"--data.train={data}", "--data.eval=[]", f"--train.output_dir={out}",
            "--train.progress=false", "--train.report=false", "--train.batch_size=4", *overrides]


def pairs_file(path: Path, n: int, seed: int) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_preferences(n, seed=seed)), encoding="utf-8")
    return path


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], says: str) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, out + err
    assert "Traceback" not in out + err
    assert re.search(says, err, flags=re.S), err
    return err


@pytest.fixture
def users_folder(tmp_path: Path) -> Path:
    """A folder holding the user's own files under names a run also writes."""
    folder = tmp_path / "mine"
    (folder / "plots").mkdir(parents=True)
    (folder / "tensorboard" / "other-exp").mkdir(parents=True)
    (folder / "config.yaml").write_text("# my own notes\nlr: 1\n")
    (folder / "plots" / "fig.png").write_bytes(b"\x89PNG not really")
    (folder / "tensorboard" / "other-exp" / "events").write_bytes(b"events of another tool")
    (folder / "status.json").write_text('{"mine": true}')
    return folder


def test_a_run_never_touches_files_it_did_not_write(tiny_model_dir: Path, tmp_path: Path, users_folder: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    before = tree(users_folder)
    bad = tmp_path / "nan.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": " a", "rejected": " b", "margin": float("nan")}) + "\n")
    good = pairs_file(tmp_path / "good.jsonl", 8, seed=1)
    for data, extra in ((bad, ()), (good, ()), (good, ("--train.overwrite=true",))):
        refused(dpo(tiny_model_dir, data, users_folder, "--train.max_steps=1", *extra), capsys, r"mine/(config\.yaml|status\.json).*not written")
        assert tree(users_folder) == before


def test_a_run_failing_before_training_puts_the_folder_back(tiny_model_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """An earlier run that never trained, then one replacing it that fails on bad data: byte for byte
    as found, subfolders included; a new folder is removed again."""
    good = pairs_file(tmp_path / "good.jsonl", 8, seed=1)
    out = tmp_path / "run"
    assert main(dpo(tiny_model_dir, good, out, "--train.max_steps=2", "--train.save_every=1")) == 0
    (out / "plots").mkdir()
    (out / "plots" / "extra.txt").write_text("drawn by the run")  # a run's own subfolder, as a report leaves it
    before = tree(out)
    empty = tmp_path / "all-bad.jsonl"
    empty.write_text(json.dumps({"prompt": "p", "chosen": " a", "rejected": " a"}) + "\n")  # identical: dropped
    err = refused(dpo(tiny_model_dir, empty, out, "--train.overwrite=true"), capsys, r"no training pairs.*dropped")
    assert "data_report.json" not in err  # no pointer to a file that is not there
    assert tree(out) == before
    fresh = tmp_path / "fresh" / "run"
    refused(dpo(tiny_model_dir, empty, fresh), capsys, r"no training pairs")
    assert not fresh.exists()


def test_overwrite_checks_every_entry_before_deleting_any(tiny_model_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    good = pairs_file(tmp_path / "good.jsonl", 8, seed=1)
    out = tmp_path / "run"
    assert main(dpo(tiny_model_dir, good, out, "--train.max_steps=1")) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    (out / "plots").symlink_to(elsewhere)
    before = tree(out)
    refused(dpo(tiny_model_dir, good, out, "--train.max_steps=1", "--train.overwrite=true"), capsys, r"run/plots.*symbolic link")
    assert tree(out) == before and (elsewhere / "keep.txt").read_text() == "keep"
    (out / "plots").unlink()
    assert main(dpo(tiny_model_dir, good, out, "--train.max_steps=1", "--train.overwrite=true")) == 0
    assert not (out / ".preftune-replaced").exists()


def test_an_empty_output_dir_is_refused(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    good = pairs_file(tmp_path / "good.jsonl", 4, seed=1)
    before = tree(tmp_path)
    refused(dpo(tiny_model_dir, good, Path("x"), "--train.output_dir="), capsys, r"train\.output_dir")
    assert tree(tmp_path) == before


def test_a_resume_on_changed_data_is_refused_naming_the_file(tiny_model_dir: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    data = pairs_file(tmp_path / "train.jsonl", 16, seed=1)
    out = tmp_path / "run"
    assert main(dpo(tiny_model_dir, data, out, "--train.max_steps=2", "--train.save_every=1")) == 0
    assert json.loads((out / "checkpoints" / "step-2" / "data_digests.json").read_text()) == {
        str(data): hashlib.sha256(data.read_bytes()).hexdigest()}
    pairs_file(data, 6, seed=9)  # the same path, other pairs
    before = tree(out)
    refused(dpo(tiny_model_dir, data, out, "--train.max_steps=3", "--train.resume_from=latest"), capsys,
            re.escape(str(data)) + r".*changed since checkpoint")
    assert tree(out) == before


def test_a_refused_resume_leaves_a_finished_run_as_it_was(tiny_model_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint file that cannot be read as plain data (a pickle that would run code) is refused
    before anything is written: status.json stays finished, config.yaml and data_report.json unchanged."""
    import pickle

    data = pairs_file(tmp_path / "train.jsonl", 8, seed=1)
    out = tmp_path / "run"
    assert main(dpo(tiny_model_dir, data, out, "--train.max_steps=2", "--train.save_every=2")) == 0
    step = out / "checkpoints" / "step-2"
    (step / "rng.pt").write_bytes(pickle.dumps(print))
    from preftune.training.checkpoint import write_manifest

    write_manifest(step)  # intact by its manifest: only reading it as plain data finds the problem
    before = tree(out)
    refused(dpo(tiny_model_dir, data, out, "--train.max_steps=3", "--train.resume_from=latest"), capsys, r"step-2.*plain data")
    assert tree(out) == before
    assert json.loads((out / "status.json").read_text())["status"] == "finished"


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_partial_files(tiny_model_dir: Path, tmp_path: Path,
                                                                                capsys: pytest.CaptureFixture[str],
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import torch

    real_save = torch.save

    def full_disk(obj: object, path: object, *args: object, **kwargs: object) -> None:
        if str(path).endswith("optimizer.pt"):
            Path(str(path)).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    data = pairs_file(tmp_path / "train.jsonl", 8, seed=1)
    out = tmp_path / "run"
    refused(dpo(tiny_model_dir, data, out, "--train.max_steps=2", "--train.save_every=1"), capsys,
            r"no space left on the device to write checkpoint '[^']*checkpoints/step-1': it needs about [\d.]+ MiB.*partial files were removed")
    assert not list((out / "checkpoints").iterdir())


def test_a_stale_status_naming_a_reused_pid_does_not_block_and_a_held_lock_does(tiny_model_dir: Path, tmp_path: Path,
                                                                               capsys: pytest.CaptureFixture[str]) -> None:
    import fcntl
    import os
    import socket

    from preftune.system.runfolder import process_start

    data = pairs_file(tmp_path / "train.jsonl", 8, seed=1)
    out = tmp_path / "run"
    assert main(dpo(tiny_model_dir, data, out, "--train.max_steps=1")) == 0
    other = os.getppid()  # alive, and not a preftune run
    stale = {"status": "running", "pid": other, "pid_start": "0", "host": socket.gethostname()}
    (out / "status.json").write_text(json.dumps(stale))  # a crash, then the pid reused by another process
    assert main(dpo(tiny_model_dir, data, out, "--train.max_steps=1", "--train.overwrite=true")) == 0
    (out / "status.json").write_text(json.dumps({**stale, "pid_start": process_start(other)}))
    before = tree(out)
    refused(dpo(tiny_model_dir, data, out, "--train.max_steps=1", "--train.overwrite=true"), capsys, rf"another preftune run \(pid {other}\)")
    assert tree(out) == before
    (out / "status.json").write_text(json.dumps({"status": "finished", "step": 1}))
    with (out / ".preftune-lock").open("a") as held:  # another run holds the folder's lock
        fcntl.flock(held, fcntl.LOCK_EX)
        before = tree(out)
        refused(dpo(tiny_model_dir, data, out, "--train.max_steps=1", "--train.overwrite=true"), capsys, r"holds .*\.preftune-lock")
        assert tree(out) == before
    assert main(dpo(tiny_model_dir, data, out, "--train.max_steps=1", "--train.overwrite=true")) == 0

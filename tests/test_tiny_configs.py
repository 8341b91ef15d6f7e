"""Every shipped configs/*-tiny.yaml runs exactly as written, through the CLI, after `preftune tiny`
(the newcomer's path: the model and data they point at, then the verb; no override)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from preftune.cli.main import main

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*-tiny.yaml"))


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory: pytest.TempPathFactory, one_thread: None):  # noqa: ANN201
    """A working folder where `preftune tiny` ran, as the current folder (the configs' paths are relative to it)."""
    folder = tmp_path_factory.mktemp("newcomer")
    before = Path.cwd()
    os.chdir(folder)
    try:
        assert main(["tiny"]) == 0
        yield folder
    finally:
        os.chdir(before)


def test_the_tiny_setup_is_the_same_files_every_time(newcomer: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tiny", "--model-dir", "again/model", "--data-dir", "again/data"]) == 0
    assert "preftune: tiny model in again/model" in capsys.readouterr().out
    for first, second in (("runs/tiny-model", "again/model"), ("runs/tiny-data", "again/data")):
        names = sorted(p.name for p in (newcomer / first).iterdir())
        assert names == sorted(p.name for p in (newcomer / second).iterdir())
        for name in names:
            assert (newcomer / first / name).read_bytes() == (newcomer / second / name).read_bytes(), f"{first}/{name} differs"
    (newcomer / "not-a-model").mkdir()
    (newcomer / "not-a-model" / "notes.txt").write_text("mine")
    assert main(["tiny", "--model-dir", "not-a-model"]) == 2
    assert "'not-a-model' holds files but no model (config.json)" in capsys.readouterr().err


def test_every_verb_has_its_tiny_config() -> None:
    assert TINY_CONFIGS == ["dpo-tiny.yaml", "iterate-tiny.yaml", "kto-tiny.yaml", "rm-tiny.yaml", "sft-tiny.yaml"]


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_a_tiny_config_runs_as_written(newcomer: Path, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    verb = name.removesuffix("-tiny.yaml")
    assert main([verb, str(REPO / "configs" / name)]) == 0, capsys.readouterr().err
    run = newcomer / "runs" / f"{verb}-tiny"
    if verb == "iterate":
        assert len(json.loads((run / "iterate.json").read_text())["rounds"]) == 2
    else:
        assert json.loads((run / "status.json").read_text())["status"] == "finished"
        assert (run / "final" / "config.json").is_file()


def test_a_newcomer_who_skips_preftune_tiny_is_told_what_to_run(newcomer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for verb in ("dpo", "iterate"):
        for _ in range(2):  # nothing is left behind that would refuse the same command again
            assert main([verb, str(REPO / "configs" / f"{verb}-tiny.yaml")]) == 2
            err = capsys.readouterr().err
            assert f"no folder 'runs/tiny-model' (relative to {tmp_path}) (the model of configs/*-tiny.yaml: `preftune tiny` writes it" in err
            assert "`hf download runs/tiny-model`" in err and "huggingface-cli" not in err  # it can be a hub id: the hint follows
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny-model").symlink_to(newcomer / "runs" / "tiny-model")
    for verb in ("sft", "iterate"):
        assert main([verb, str(REPO / "configs" / f"{verb}-tiny.yaml")]) == 2
        assert f"runs/tiny-data/train.jsonl: no such file or folder (relative to {tmp_path})" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["tiny-model"]

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
    err = capsys.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err  # transformers' bars are quiet under preftune's
    run = newcomer / "runs" / f"{verb}-tiny"
    if verb == "iterate":
        assert len(json.loads((run / "iterate.json").read_text())["rounds"]) == 2
        return
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert (run / "final" / "config.json").is_file()
    ours = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("preftune: ")]
    assert len(ours) == 2 and ours[0].startswith(f"preftune: {verb}: model runs/tiny-model (0.05M parameters); train data: kept "), ours
    assert "train.bf16 auto -> off (" in ours[0] and "train.compile auto -> off (" in ours[0]
    assert err.endswith(f"preftune: done: model in runs/{verb}-tiny/final, metrics in runs/{verb}-tiny/metrics.jsonl, "
                        f"report runs/{verb}-tiny/report.html\n")  # the last line


def test_without_progress_a_run_says_two_lines(newcomer: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--train.progress=false", "--train.max_steps=2", "--train.output_dir=runs/quiet", "--train.report=false"]
    assert main(["dpo", str(REPO / "configs" / "dpo-tiny.yaml"), *args]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0] == ("preftune: dpo: model runs/tiny-model (0.05M parameters); train data: kept 64 of 64 pairs; eval data: kept 32 "
                        "of 32 pairs; reference copy; train.bf16 auto -> off (CPU without bf16 units (as $PREFTUNE_CPU_BF16_UNITS=0 "
                        "says)); train.compile auto -> off (CPU, 2 planned steps < 1292749 for a model of 0.05M parameters: compiling "
                        "would not pay for itself)")
    assert lines[1] == "preftune: done: model in runs/quiet/final, metrics in runs/quiet/metrics.jsonl"


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


def test_the_readmes_first_training_command_is_a_tiny_config_as_written() -> None:
    """What the tests above run is what the README tells a newcomer to type first."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    commands = [line.split("#")[0].strip() for line in readme.splitlines() if line.startswith(".venv/bin/preftune ")]
    training = [c for c in commands if c.split()[1] in ("tiny", "dpo", "sft", "rm", "kto", "iterate")]
    assert training[:2] == [".venv/bin/preftune tiny", ".venv/bin/preftune dpo configs/dpo-tiny.yaml"]

"""inspect.py: `preftune data inspect` prints the report (text or one JSON object)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from preftune.data import inspect as data_inspect
from preftune.data import load_examples
from preftune.data.validate import FINDINGS
from preftune.errors import ConfigError, DataError, PreftuneError

PANDALM = SHARED_DATA / "pandalm-testset" / "testset-v1.json"

RECORDS = [
    {"prompt": "the a of", "chosen": " good kind", "rejected": " bad cold"},
    {"prompt": "the a of", "chosen": " same", "rejected": " same"},
    {"prompt": "to and in is", "chosen": " great", "rejected": " "},
]


def inspect(*argv: str) -> int:
    """`preftune data inspect ARGV` through the CLI (``--debug``: errors raise, as the library's do)."""
    from preftune.cli import main

    return main(["--debug", "data", "inspect", *argv])


@pytest.fixture()
def small(tmp_path: Path) -> Path:
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + "{broken\n", encoding="utf-8")
    return path


def test_json_output_is_one_object_with_the_report(small: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert inspect(str(small), "--on-error", "skip", "--json") == 0
    out = capsys.readouterr().out
    summary = json.loads(out)  # the whole of stdout is one JSON value
    assert isinstance(summary, dict)
    assert (summary["records"], summary["kept"]) == (4, 2)
    assert summary["dropped"] == {"identical_pairs": 1, "invalid_json": 1}
    assert set(FINDINGS) <= set(summary["findings"])
    assert summary["findings"]["blank_rejected"] == 1 and summary["findings"]["duplicate_prompts"] == 0
    assert summary["examples"]["invalid_json"] == [f"{small}:4"]
    assert "tokens" not in summary and "truncation" not in summary


def test_text_output_lists_counts_and_locations(small: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert inspect(str(small), "--on-error", "skip") == 0
    lines = capsys.readouterr().out.splitlines()
    assert "records   4" in lines and "kept      2" in lines and "dropped   2" in lines
    assert any(line.split()[:2] == ["invalid_json", "1"] and f"{small}:4" in line for line in lines)
    assert any(line.split() == ["identical_pairs", "1", "(dropped)"] for line in lines)
    assert any(line.split()[:2] == ["blank_rejected", "1"] and f"{small}:3" in line for line in lines)
    for name in FINDINGS:
        assert any(line.split()[:1] == [name] for line in lines), name


def test_by_default_every_record_is_checked_and_the_exit_status_says_training_would_refuse(
        small: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert inspect(str(small), "--json") == 1  # the whole picture, and a status that says "not trainable as is"
    captured = capsys.readouterr()
    assert json.loads(captured.out)["dropped"] == {"identical_pairs": 1, "invalid_json": 1}
    assert "1 malformed record(s): training (data.on_error: error) would stop at the first" in captured.err
    with pytest.raises(DataError, match="line 4: invalid JSON"):  # --on-error error: stop where training stops
        inspect(str(small), "--on-error", "error")
    assert inspect(str(small), "--on-error", "skip", "--json") == 0


def test_columns_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"q": "p", "good": "a", "bad": "b"}) + "\n", encoding="utf-8")
    assert inspect(str(path), "--columns", "prompt=q, chosen=good,rejected=bad", "--json") == 0
    assert json.loads(capsys.readouterr().out)["kept"] == 1
    assert data_inspect.parse_columns("") == {}
    with pytest.raises(ConfigError, match="OURS=THEIRS"):
        data_inspect.parse_columns("prompt")


@pytest.mark.skipif(not PANDALM.is_file(), reason=f"shared data not found at {PANDALM}")
def test_cli_json_on_real_data_matches_the_loader(capsys: pytest.CaptureFixture[str]) -> None:
    from preftune.cli import main

    assert main(["data", "inspect", str(PANDALM), "--on-error", "skip", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    report = load_examples(PANDALM, on_error="skip").report
    assert summary["records"] == report.records and summary["kept"] == report.kept
    assert summary["dropped"] == report.dropped and summary["findings"] == report.findings


def test_not_a_tokenizer_folder_is_a_clear_error(small: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    with pytest.raises(PreftuneError, match="holds no tokenizer"):
        inspect(str(small), "--on-error", "skip", "--tokenizer", str(empty))
    with pytest.raises(PreftuneError, match="no folder '.*nope'"):
        inspect(str(small), "--on-error", "skip", "--tokenizer", str(tmp_path / "nope"))


def test_token_statistics_with_a_tokenizer(small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from preftune.data.tokenize import tokenize_pairs  # noqa: F401  (written alongside; see report)
    from preftune.models.tiny import synthetic_corpus, train_tokenizer

    folder = tmp_path / "tok"
    train_tokenizer(synthetic_corpus(), vocab_size=300, out_dir=folder)
    argv = [str(small), "--on-error", "skip", "--tokenizer", str(folder), "--max-length", "8", "--max-prompt-length", "4"]
    assert inspect(*argv, "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tokens"] and isinstance(summary["truncation"], dict)
    assert summary["kept"] == 2
    assert inspect(*argv) == 0
    text = capsys.readouterr().out
    assert "\ntokens\n" in text and "\ntruncation\n" in text


def test_weights_are_counted_in_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "weighted.jsonl"
    records = [dict(r, prompt=f"p{i}", weight=w) for i, (r, w) in enumerate(zip(RECORDS[:1] * 3, [0.0, 2.5, 1.0]))]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    assert inspect(str(path)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[:2] == ["weighted", "2"] for line in lines)
    assert any(line.split()[:2] == ["zero_weight", "1"] for line in lines)
    path.write_text(json.dumps(dict(RECORDS[0], weight=float("nan"))) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="weight"):
        inspect(str(path), "--on-error", "error")

"""A corpus of bad inputs: each stops with a DataError that says where (file, line or record,
field) and what, or, with on_error="skip", is left out and counted under its reason."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from preftune.cli import main
from preftune.data import load_examples
from preftune.errors import DataError, PreftuneError

GOOD = {"prompt": "p", "chosen": "c", "rejected": "r"}


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return path


def _lines(*records: object) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


# Each case: file name, content, and what the error must say (file name is always checked).
CASES = {
    "malformed_json_line": ("bad.jsonl", _lines(GOOD, '{"prompt": "p", "chosen": ', GOOD),
                            ["line 2", "invalid JSON"], "invalid_json"),
    "missing_field": ("d.jsonl", _lines(GOOD, {"prompt": "p", "chosen": "c"}),
                      ["line 2", "field 'rejected'", "is missing", "the record has: chosen, prompt"], "missing_field"),
    "null_field": ("d.jsonl", _lines({"prompt": None, "chosen": "c", "rejected": "r"}),
                   ["line 1", "field 'prompt'", "is null"], "missing_field"),
    "number_instead_of_text": ("d.jsonl", _lines(GOOD, GOOD, {"prompt": "p", "chosen": 42, "rejected": "r"}),
                               ["line 3", "field 'chosen'", "must be text, got int 42"], "non_string"),
    "true_instead_of_text": ("d.json", json.dumps([GOOD, {"prompt": "p", "chosen": "c", "rejected": True}]),
                             ["record 1", "field 'rejected'", "must be text, got bool True"], "non_string"),
    "not_an_object": ("d.jsonl", _lines(GOOD, "[1, 2, 3]"), ["line 2", "must be a JSON object, got an array"], "not_an_object"),
    "unknown_role": ("chat.jsonl", _lines({"chosen": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}],
                                           "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}),
                     ["line 1", "field 'chosen[1]'", "unknown role 'bot'"], "unknown_role"),
    "empty_messages": ("chat.jsonl", _lines({"prompt": [{"role": "user", "content": "q"}], "chosen": [],
                                             "rejected": [{"role": "assistant", "content": "b"}]}),
                       ["line 1", "field 'chosen'", "empty list of messages"], "empty_messages"),
    "vote_out_of_range": ("v.jsonl", _lines({"instruction": "i", "input": "", "response1": "a", "response2": "b",
                                             "annotator1": 1, "annotator2": 3}),
                          ["line 1", "field 'annotator2'", "must be 0 (tie), 1 or 2, got int 3"], "wrong_type"),
    "invalid_utf8_line": ("u.jsonl", _lines(GOOD, GOOD).encode() + b'{"prompt": "\xff\xfe", "chosen": "c", "rejected": "r"}\n',
                          ["line 3", "not valid UTF-8", "0xff"], "invalid_utf8"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_record_raises_with_location(tmp_path: Path, case: str) -> None:
    name, content, phrases, reason = CASES[case]
    path = _write(tmp_path / name, content)
    with pytest.raises(DataError) as err:
        load_examples(path)
    message = str(err.value)
    assert message.startswith(f"{path}, "), message
    for phrase in phrases:
        assert phrase in message, (phrase, message)
    assert err.value.reason == reason
    assert "on_error: skip" in message  # the way out is named


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_record_is_skipped_and_counted(tmp_path: Path, case: str) -> None:
    name, content, _, reason = CASES[case]
    path = _write(tmp_path / name, content)
    good_records = len(load_examples(path, on_error="skip").examples)
    report = load_examples(path, on_error="skip").report
    assert report.dropped == {reason: 1}
    assert report.records == good_records + 1 == report.kept + 1
    assert len(report.examples[reason]) == 1 and report.examples[reason][0].startswith(f"{path}:")


def test_skip_mode_counts_each_reason_and_keeps_the_rest(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "mixed.jsonl",
        _lines(GOOD, "not json", {"prompt": "p"}, {"prompt": "p", "chosen": 1, "rejected": "r"}, "also not json",
               {"prompt": "q", "chosen": "c", "rejected": "r"}, "7").encode()
        + b'{"prompt": "\xc3\x28"}\n',
    )
    result = load_examples(path, on_error="skip")
    report = result.report
    assert report.dropped == {"invalid_json": 2, "missing_field": 1, "non_string": 1, "not_an_object": 1, "invalid_utf8": 1}
    assert report.findings["non_string"] == 1
    assert report.examples["invalid_json"] == [f"{path}:2", f"{path}:5"]
    assert [e.prompt for e in result.examples] == ["p", "q"]
    assert (report.records, report.kept) == (8, 2)


# --------------------------------------------------------------------------- whole-file problems
@pytest.mark.parametrize(
    ("name", "content", "phrase", "reason"),
    [
        ("empty.jsonl", "", "holds no records", "empty_file"),
        ("blank.jsonl", "\n  \n\n", "holds no records", "empty_file"),
        ("empty.json", "[]", "holds no records", "empty_file"),
        ("empty.csv", "prompt,chosen,rejected\n", "holds no records", "empty_file"),
        ("empty.jsonl.gz", gzip.compress(b""), "holds no records", "empty_file"),
        ("notes.txt", "hello", "unsupported file type '.txt'", "unsupported_extension"),
        ("data", "hello", "unsupported file type 'data'", "unsupported_extension"),
        ("d.parquet.gz", gzip.compress(b"PAR1"), "unsupported file type '.parquet.gz'", "unsupported_extension"),
        ("scalar.json", "42", "must hold a JSON array", "not_an_object"),
        ("broken.json", json.dumps([GOOD, GOOD])[:-20], "invalid JSON", "invalid_json"),
        ("nocomma.json", f"[{json.dumps(GOOD)} {json.dumps(GOOD)}]", "expected ',' or ']'", "invalid_json"),
        ("trailing.json", f"[{json.dumps(GOOD)}] {json.dumps(GOOD)}", "after the closing ']'", "invalid_json"),
        ("damaged.jsonl.gz", gzip.compress(_lines(GOOD, GOOD).encode())[:-12], "cannot be read", "unreadable"),
        ("bad.parquet", "not parquet", "not a readable Parquet file", "unreadable"),
    ],
)
def test_bad_files(tmp_path: Path, name: str, content: str | bytes, phrase: str, reason: str) -> None:
    path = _write(tmp_path / name, content)
    for on_error in ("error", "skip"):  # nothing to skip over: these stop in both modes
        with pytest.raises(DataError) as err:
            load_examples(path, on_error=on_error)
        assert str(err.value).startswith(str(path)) and phrase in str(err.value), str(err.value)
        assert err.value.reason == reason


def test_broken_json_array_names_the_record(tmp_path: Path) -> None:
    text = json.dumps([GOOD, GOOD, GOOD], indent=2)
    path = _write(tmp_path / "cut.json", text.replace('"rejected": "r"\n  }\n]', '"rejected": "r"'))
    with pytest.raises(DataError, match=r"record 2: invalid JSON") as err:
        load_examples(path)
    assert "(line 1" in str(err.value)  # the file line where decoding failed


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder") as err:
        load_examples(tmp_path / "nope.jsonl")
    assert err.value.file == str(tmp_path / "nope.jsonl")


def test_invalid_utf8_in_json_array_and_csv(tmp_path: Path) -> None:
    for name, content in (("a.json", b'[{"prompt": "\xff"}]'), ("a.csv", b"prompt,chosen,rejected\np,c,\xff\n")):
        with pytest.raises(DataError, match="not valid UTF-8") as err:
            load_examples(_write(tmp_path / name, content))
        assert err.value.reason == "invalid_utf8"


def test_pretty_printed_object_in_json_file_gets_a_hint(tmp_path: Path) -> None:
    path = _write(tmp_path / "one.json", json.dumps(GOOD, indent=2))
    with pytest.raises(DataError, match="one JSON array of records, or one JSON object per line"):
        load_examples(path)


def test_unknown_format_is_not_skippable(tmp_path: Path) -> None:
    path = _write(tmp_path / "q.jsonl", _lines({"question": "q", "answer": "a"}))
    with pytest.raises(DataError, match="cannot tell the format"):
        load_examples(path, on_error="skip")


def test_renamed_field_errors_name_the_files_own_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", _lines({"question": "q", "good": "a", "bad": 5}))
    with pytest.raises(DataError) as err:
        load_examples(path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert "field 'bad'" in str(err.value) and "(read as 'rejected')" in str(err.value)


# --------------------------------------------------------------------------- huge records
HUGE = "y" * 5_000_000


@pytest.mark.parametrize("name", ["huge.jsonl", "huge.json", "huge.csv", "huge.jsonl.gz"])
def test_a_5mb_record_loads(tmp_path: Path, name: str) -> None:
    records = [GOOD, {"prompt": "p", "chosen": HUGE, "rejected": "r"}, GOOD]
    if name.endswith(".csv"):
        content: str | bytes = "prompt,chosen,rejected\n" + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\n" for r in records)
    elif name.endswith(".json"):
        content = json.dumps(records)
    else:
        content = _lines(*records)
    if name.endswith(".gz"):
        content = gzip.compress(content.encode())
    result = load_examples(_write(tmp_path / name, content))
    assert [len(e.chosen) for e in result.examples] == [1, 5_000_000, 1]


# --------------------------------------------------------------------------- the command line
def test_cli_error_is_one_message_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path / "bad.jsonl", _lines(GOOD, "{oops"))
    assert main(["data", "inspect", str(path), "--on-error", "error"]) == 2  # stop where training stops
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("preftune: error: ") and f"{path}, line 2: invalid JSON" in captured.err
    assert "Traceback" not in captured.err


def test_cli_debug_shows_the_exception(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.jsonl", _lines("{oops"))
    with pytest.raises(PreftuneError):
        main(["--debug", "data", "inspect", str(path), "--on-error", "error"])

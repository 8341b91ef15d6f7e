"""formats.py, validate.py and load.py: detection, normalisation, findings, what is kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preftune.data import LoadResult, PreferenceExample, UnpairedExample, load_examples
from preftune.data.formats import detect_format, tally_votes
from preftune.data.hh import hh_prompt, split_hh
from preftune.data.readers import RawRecord
from preftune.data.validate import FINDINGS
from preftune.errors import ConfigError, DataError


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _load(tmp_path: Path, records: list[dict], name: str = "d.jsonl", **kwargs) -> LoadResult:
    return load_examples(_jsonl(tmp_path / name, records), **kwargs)


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"prompt": "p", "chosen": "c", "rejected": "r"}, "explicit"),
        ({"chosen": [_msg("user", "q"), _msg("assistant", "a")], "rejected": []}, "conversational"),
        ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "x"}, "hh"),
        ({"instruction": "i", "response1": "a", "response2": "b", "annotator1": 1}, "votes"),
        ({"prompt": "p", "completion": "c", "label": True}, "unpaired"),
    ],
)
def test_detect_format(record: dict, expected: str) -> None:
    assert detect_format(RawRecord(record, "f.jsonl", 1, 0), record) == expected


def test_undetectable_format_suggests_columns() -> None:
    record = {"question": "q", "good": "a", "bad": "b"}
    with pytest.raises(DataError, match="--columns") as err:
        detect_format(RawRecord(record, "f.jsonl", 4, 3), record)
    assert "f.jsonl, line 4" in str(err.value) and "'question'" in str(err.value)


# --------------------------------------------------------------------------- explicit
def test_explicit_with_system_default_and_own_system(tmp_path: Path) -> None:
    result = _load(
        tmp_path,
        [
            {"prompt": "p0", "chosen": "c0", "rejected": "r0"},
            {"prompt": "p1", "chosen": "c1", "rejected": "r1", "system": "own"},
            {"prompt": "p2", "chosen": "c2", "rejected": "r2", "system": None},
        ],
        system="default",
    )
    assert result.report.format == "explicit"
    assert [(e.prompt, e.chosen, e.rejected, e.system) for e in result.examples] == [
        ("p0", "c0", "r0", "default"),
        ("p1", "c1", "r1", "own"),
        ("p2", "c2", "r2", "default"),
    ]
    assert result.examples[1].source == f"{tmp_path / 'd.jsonl'}:2"


def test_columns_rename_before_detection(tmp_path: Path) -> None:
    records = [{"question": "q", "good": "a", "bad": "b", "id": 7}]
    result = _load(tmp_path, records, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert result.report.format == "explicit"
    assert (result.examples[0].prompt, result.examples[0].chosen, result.examples[0].rejected) == ("q", "a", "b")


# --------------------------------------------------------------------------- conversational
def test_conversational_implicit_prompt_is_the_shared_prefix(tmp_path: Path) -> None:
    shared = [_msg("system", "be brief"), _msg("user", "q1"), _msg("assistant", "a1"), _msg("user", "q2")]
    record = {"chosen": shared + [_msg("assistant", "good")], "rejected": shared + [_msg("assistant", "bad")]}
    example = _load(tmp_path, [record], system="ignored: the prompt has a system message").examples[0]
    assert example.prompt == shared
    assert example.chosen == [_msg("assistant", "good")]
    assert example.rejected == [_msg("assistant", "bad")]
    assert example.system is None


def test_conversational_one_side_a_prefix_of_the_other(tmp_path: Path) -> None:
    short = [_msg("user", "q"), _msg("assistant", "a")]
    longer = short + [_msg("user", "more?"), _msg("assistant", "yes")]
    example = _load(tmp_path, [{"chosen": longer, "rejected": short}]).examples[0]
    assert example.prompt == [_msg("user", "q")]
    assert example.chosen == longer[1:] and example.rejected == short[1:]


def test_conversational_explicit_prompt_and_repeated_prompt_is_stripped(tmp_path: Path) -> None:
    prompt = [_msg("user", "q")]
    records = [
        {"prompt": prompt, "chosen": [_msg("assistant", "a")], "rejected": [_msg("assistant", "b")]},
        # UltraFeedback-binarized style: string prompt, full conversations as completions
        {"prompt": "q", "chosen": prompt + [_msg("assistant", "a")], "rejected": prompt + [_msg("assistant", "b")]},
    ]
    examples = _load(tmp_path, records, system="sys").examples
    for example in examples:
        assert (example.prompt, example.chosen, example.rejected) == (prompt, [_msg("assistant", "a")], [_msg("assistant", "b")])
        assert example.system == "sys"


def test_conversational_messages_keep_only_role_and_content(tmp_path: Path) -> None:
    extra = {"role": "assistant", "content": "a", "name": "bot", "id": 3}
    example = _load(tmp_path, [{"prompt": [_msg("user", "q")], "chosen": [extra], "rejected": [_msg("assistant", "b")]}]).examples[0]
    assert example.chosen == [_msg("assistant", "a")]


@pytest.mark.parametrize(
    ("chosen", "rejected", "field", "reason"),
    [
        ([_msg("user", "q1"), _msg("assistant", "a")], [_msg("user", "q2"), _msg("assistant", "a")], "chosen", "prompt_diverges"),
        ([_msg("user", "q")], [_msg("user", "q")], "chosen", "prompt_diverges"),
        ([_msg("user", "q"), _msg("robot", "a")], [_msg("user", "q")], "chosen[1]", "unknown_role"),
        ([_msg("user", "q"), {"role": "assistant"}], [_msg("user", "q")], "chosen[1]", "missing_field"),
        ([_msg("user", "q"), {"role": "assistant", "content": 3}], [_msg("user", "q")], "chosen[1].content", "non_string"),
        ([_msg("user", "q"), "hello"], [_msg("user", "q")], "chosen[1]", "wrong_type"),
        ([_msg("user", "q"), _msg("assistant", "a")], [], "rejected", "empty_messages"),
        ([_msg("user", "q"), _msg("assistant", "a")], "text", "rejected", "wrong_type"),
    ],
)
def test_conversational_malformed(tmp_path: Path, chosen: list, rejected: list, field: str, reason: str) -> None:
    with pytest.raises(DataError) as err:
        _load(tmp_path, [{"chosen": chosen, "rejected": rejected}], format="conversational")
    assert (err.value.field, err.value.reason, err.value.line) == (field, reason, 1)
    assert f"field '{field}'" in str(err.value)


def test_conversational_completion_must_start_with_assistant(tmp_path: Path) -> None:
    record = {"prompt": [_msg("user", "q")], "chosen": [_msg("user", "again")], "rejected": [_msg("assistant", "b")]}
    with pytest.raises(DataError, match="starts with a user message") as err:
        _load(tmp_path, [record])
    assert err.value.reason == "wrong_role"


# --------------------------------------------------------------------------- hh
H, A = "\n\nHuman:", "\n\nAssistant:"


def test_hh_prompt_matches_the_edge_cases_definition() -> None:
    text = f"{H} hi{A} hello{H} how?{A} fine"
    assert hh_prompt(text) == f"{H} hi{A} hello{H} how?{A}"
    assert hh_prompt(text) == text[: text.rfind(A) + len(A)]


def test_hh_split_keeps_the_shorter_prompt_when_a_fake_turn_disagrees(tmp_path: Path) -> None:
    prompt = f"{H} q{A}"
    records = [
        {"chosen": prompt + " good", "rejected": prompt + " bad"},
        # the model wrote a fake Assistant turn inside the rejected response
        {"chosen": prompt + " good2", "rejected": prompt + f" bad{H} more{A} fake"},
    ]
    result = _load(tmp_path, records)
    assert result.report.format == "hh"
    assert [(e.prompt, e.chosen, e.rejected) for e in result.examples] == [
        (prompt, " good", " bad"),
        (prompt, " good2", f" bad{H} more{A} fake"),
    ]
    assert split_hh(records[1]["chosen"], records[1]["rejected"]) == (prompt, True)
    assert result.report.findings["prompt_mismatch"] == 1
    assert result.report.findings["fake_turn_in_completion"] == 1
    assert result.report.examples["prompt_mismatch"] == [f"{tmp_path / 'd.jsonl'}:2"]


def test_hh_different_conversations_and_missing_marker_are_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="different conversations") as err:
        _load(tmp_path, [{"chosen": f"{H} a{A} x", "rejected": f"{H} b{A} y"}], format="hh")
    assert err.value.reason == "prompt_diverges"
    with pytest.raises(DataError, match="no '\\\\n\\\\nAssistant:' turn") as err:
        _load(tmp_path, [{"chosen": f"{H} a{A} x", "rejected": f"{H} a"}], format="hh")
    assert (err.value.field, err.value.reason) == ("rejected", "no_assistant_marker")


# --------------------------------------------------------------------------- votes
@pytest.mark.parametrize(
    ("votes", "winner", "preference"),
    [
        ([2, 2, 2], 2, 1.0),
        ([1, 1, 1], 1, 1.0),
        ([2, 1, 2], 2, 2 / 3),
        ([1, 1, 2], 1, 2 / 3),
        ([1, 0, 1], 1, 1.0),
        ([0, 2, 2], 2, 1.0),
        ([2, 0, 0], 0, 0.0),
        ([0, 0, 0], 0, 0.0),
        ([1, 2, 0], 0, 0.0),
        ([1, 1, 2, 2], 0, 0.0),
        ([1, 1, 0, 0], 0, 0.0),
        ([1, 1, 1, 2, 0], 1, 0.75),
    ],
)
def test_tally_votes(votes: list[int], winner: int, preference: float) -> None:
    got_winner, got_preference = tally_votes(votes)
    assert got_winner == winner
    assert got_preference == pytest.approx(preference)


def test_votes_records_become_soft_pairs_and_ties_are_left_out(tmp_path: Path) -> None:
    base = {"instruction": "Do it.", "response1": "one", "response2": "two"}
    records = [
        {**base, "input": "", "annotator1": 2, "annotator2": 2, "annotator3": 2},
        {**base, "input": "ctx", "annotator1": 1, "annotator2": 2, "annotator3": 1},
        {**base, "input": "", "annotator1": 0, "annotator2": 0, "annotator3": 1},
    ]
    result = _load(tmp_path, records, name="v.json")
    assert [(e.prompt, e.chosen, e.rejected) for e in result.examples] == [
        ("Do it.", "two", "one"),
        ("Do it.\n\nctx", "one", "two"),
    ]
    assert [e.preference for e in result.examples] == pytest.approx([1.0, 2 / 3])
    report = result.report
    assert (report.records, report.kept, report.dropped) == (3, 2, {"ties": 1})
    assert report.findings["ties"] == 1
    assert report.examples["ties"] == [f"{tmp_path / 'v.json'}:3"]


def test_votes_from_csv_text(tmp_path: Path) -> None:
    path = tmp_path / "v.csv"
    path.write_text("instruction,input,response1,response2,annotator1,annotator2\nQ,,a,b,2,2\n", encoding="utf-8")
    example = load_examples(path).examples[0]
    assert (example.prompt, example.chosen, example.rejected, example.preference) == ("Q", "b", "a", 1.0)


# --------------------------------------------------------------------------- unpaired
def test_unpaired_examples(tmp_path: Path) -> None:
    records = [
        {"prompt": "p", "completion": "good", "label": True},
        {"prompt": "p", "completion": "bad", "label": False},
        {"prompt": [_msg("user", "q")], "completion": [_msg("assistant", "a")], "label": 1},
    ]
    examples = _load(tmp_path, records).examples
    assert all(isinstance(e, UnpairedExample) for e in examples)
    assert [e.desirable for e in examples] == [True, False, True]
    assert examples[2].completion == [_msg("assistant", "a")]


def test_unpaired_from_csv_labels_and_bad_label(tmp_path: Path) -> None:
    path = tmp_path / "u.csv"
    path.write_text('prompt,completion,label\np,a,true\np,b,False\np,"[{""role"": ""assistant"", ""content"": ""x""}]",0\n', encoding="utf-8")
    examples = load_examples(path).examples
    assert [e.desirable for e in examples] == [True, False, False]
    assert examples[2].completion == [_msg("assistant", "x")]
    with pytest.raises(DataError, match="must be a boolean") as err:
        _load(tmp_path, [{"prompt": "p", "completion": "c", "label": "yes"}])
    assert (err.value.field, err.value.reason) == ("label", "wrong_type")


def test_paired_and_unpaired_cannot_mix(tmp_path: Path) -> None:
    paired = _jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    unpaired = _jsonl(tmp_path / "u.jsonl", [{"prompt": "p", "completion": "c", "label": True}])
    with pytest.raises(DataError, match="cannot be mixed"):
        load_examples([paired, unpaired])


# --------------------------------------------------------------------------- findings
def test_findings_definitions_and_what_is_kept(tmp_path: Path) -> None:
    records = [
        {"prompt": "A", "chosen": "x", "rejected": "y"},  # line 1
        {"prompt": "A", "chosen": "same", "rejected": "same"},  # 2 identical: dropped, no dup
        {"prompt": "A", "chosen": "x", "rejected": "  "},  # 3 duplicate + blank rejected
        {"prompt": "A", "chosen": "", "rejected": "y"},  # 4 duplicate + blank chosen
        {"prompt": "A", "chosen": "x", "rejected": "y", "system": "S"},  # 5 other system: new
        {"prompt": " ", "chosen": "x", "rejected": "y"},  # 6 blank prompt
        {"prompt": "A", "chosen": "x", "rejected": "  "},  # 7 duplicate prompt and pair of 3
        {"prompt": "A", "chosen": "y", "rejected": "x"},  # 8 duplicate prompt, contradicts 1
    ]
    result = _load(tmp_path, records)
    report = result.report
    where = lambda *lines: [f"{tmp_path / 'd.jsonl'}:{n}" for n in lines]  # noqa: E731
    assert set(FINDINGS) <= set(report.findings)
    assert report.findings["identical_pairs"] == 1 and report.dropped == {"identical_pairs": 1}
    assert report.findings["duplicate_prompts"] == 4 and report.examples["duplicate_prompts"] == where(3, 4, 7, 8)
    assert report.findings["blank_rejected"] == 2 and report.examples["blank_rejected"] == where(3, 7)
    assert report.findings["blank_chosen"] == 1 and report.examples["blank_chosen"] == where(4)
    assert report.findings["blank_prompt"] == 1
    assert report.findings["duplicate_pairs"] == 1 and report.examples["duplicate_pairs"] == where(7)
    assert report.findings["contradictory_pairs"] == 1 and report.examples["contradictory_pairs"] == where(8)
    assert (report.records, report.kept) == (8, 7)
    assert [e.source for e in result.examples] == where(1, 3, 4, 5, 6, 7, 8)


def test_duplicates_are_counted_across_files_and_report_lists_files(tmp_path: Path) -> None:
    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": "A", "chosen": "x", "rejected": "y"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"prompt": "A", "chosen": "x2", "rejected": "y2"}])
    report = load_examples([a, str(b)]).report
    assert report.files == [str(a), str(b)]
    assert report.findings["duplicate_prompts"] == 1 and report.examples["duplicate_prompts"] == [f"{b}:1"]


def test_formats_are_detected_per_file(tmp_path: Path) -> None:
    a = _jsonl(tmp_path / "a.jsonl", [{"chosen": f"{H} q{A} x", "rejected": f"{H} q{A} y"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    result = load_examples([a, b])
    assert result.report.format == "hh+explicit" and len(result.examples) == 2


def test_max_records_is_per_file(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(5)]
    a, b = _jsonl(tmp_path / "a.jsonl", rows), _jsonl(tmp_path / "b.jsonl", rows)
    result = load_examples([a, b], max_records=2)
    assert [e.prompt for e in result.examples] == ["p0", "p1", "p0", "p1"]
    assert result.report.records == 4


def test_bad_arguments_are_config_errors(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    with pytest.raises(ConfigError, match="did you mean 'explicit'"):
        load_examples(path, format="explict")
    with pytest.raises(ConfigError, match="on_error"):
        load_examples(path, on_error="ignore")
    with pytest.raises(ConfigError, match="max_records"):
        load_examples(path, max_records=0)
    with pytest.raises(ConfigError, match="no data files"):
        load_examples([])


def test_examples_are_the_core_records(tmp_path: Path) -> None:
    example = _load(tmp_path, [{"prompt": "p", "chosen": "c", "rejected": "r"}]).examples[0]
    assert example == PreferenceExample("p", "c", "r", source=f"{tmp_path / 'd.jsonl'}:1")


def test_conversational_from_csv_json_cells_and_from_parquet(tmp_path: Path) -> None:
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    prompt = [_msg("user", "q, with a comma")]
    row = {"prompt": prompt, "chosen": [_msg("assistant", "a")], "rejected": [_msg("assistant", "b")]}
    with (tmp_path / "chat.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
        writer.writerow({k: json.dumps(v) for k, v in row.items()})
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "chat.parquet")
    for name in ("chat.csv", "chat.parquet"):
        result = load_examples(tmp_path / name)
        assert result.report.format == "conversational", name
        example = result.examples[0]
        assert (example.prompt, example.chosen, example.rejected) == (prompt, row["chosen"], row["rejected"])
        assert example.source == f"{tmp_path / name}:0"


def test_explicit_csv_text_that_looks_like_json_stays_text(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    path.write_text('prompt,chosen,rejected\n"[{""role"": ""user""}]",a,b\n', encoding="utf-8")
    assert load_examples(path).examples[0].prompt == '[{"role": "user"}]'


def test_whole_text_pairs_split_at_the_configured_marker_not_at_a_common_prefix(tmp_path: Path) -> None:
    # Both responses begin with the same word: a common-prefix split would put "Sure" in the prompt.
    path = tmp_path / "bot.jsonl"
    path.write_text(json.dumps({"chosen": "User: hi\nBot: Sure thing", "rejected": "User: hi\nBot: Sure, no"}) + "\n")
    (example,) = load_examples(path, prompt_marker="\nBot:").examples
    assert (example.prompt, example.chosen, example.rejected) == ("User: hi\nBot:", " Sure thing", " Sure, no")
    with pytest.raises(DataError, match="data.prompt_marker"):
        load_examples(path)  # HH's marker is the default, and this file has none


def test_float_labels_zero_and_one_are_booleans(tmp_path: Path) -> None:
    records = [{"prompt": "p", "completion": "a", "label": 1.0}, {"prompt": "p", "completion": "b", "label": 0.0}]
    assert [e.desirable for e in _load(tmp_path, records).examples] == [True, False]
    with pytest.raises(DataError, match="must be a boolean"):
        _load(tmp_path, [{"prompt": "p", "completion": "c", "label": 0.5}])


def test_the_weight_field_is_read_by_every_format_and_checked(tmp_path: Path) -> None:
    records = [{"prompt": "p", "chosen": f"c{i}", "rejected": "r", "weight": w} for i, w in enumerate([0.5, 2, 0, 1.0])]
    records.append({"prompt": "p", "chosen": "c9", "rejected": "r"})
    assert [e.weight for e in _load(tmp_path, records).examples] == [0.5, 2.0, 0.0, 1.0, 1.0]
    unpaired = _load(tmp_path, [{"prompt": "p", "completion": "c", "label": False, "weight": 3}], name="u.jsonl").examples
    assert unpaired[0].weight == 3.0
    path = tmp_path / "w.csv"
    path.write_text("prompt,chosen,rejected,weight\np,a,b,0.25\np,c,d,\n", encoding="utf-8")
    assert [e.weight for e in load_examples(path).examples] == [0.25, 1.0]
    # NaN (Python's json reads it), infinities, negatives, text and booleans: refused by record, naming file, line and field
    for bad, message in ((float("nan"), "must be a number"), (float("inf"), "must be a finite number"), (-1, "finite number >= 0"),
                         ("heavy", "must be a number"), (True, "must be a number")):
        lines = [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c2", "rejected": "r", "weight": bad}]
        with pytest.raises(DataError, match=message) as err:
            _load(tmp_path, lines, name="bad.jsonl")
        assert (err.value.field, err.value.line) == ("weight", 2) and "bad.jsonl, line 2" in str(err.value), bad


def test_weighted_and_zero_weight_records_are_counted(tmp_path: Path) -> None:
    records = [{"prompt": f"p{i}", "chosen": "c", "rejected": "r", "weight": w} for i, w in enumerate([1, 0.5, 0, 0, 1])]
    report = _load(tmp_path, records).report
    assert report.findings["weighted"] == 3 and report.findings["zero_weight"] == 2 and report.kept == 5
    assert report.examples["zero_weight"] == [f"{tmp_path / 'd.jsonl'}:3", f"{tmp_path / 'd.jsonl'}:4"]

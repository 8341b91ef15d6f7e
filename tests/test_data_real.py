"""The real third-party files in ../shared/data: every record is parsed or reported, and every
count in the report equals a count made here, independently, with plain Python over the raw
file (and agrees with hh-rlhf/edge_cases.json where the definitions are the same)."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from preftune.data import load_examples
from preftune.data.validate import MAX_EXAMPLES
from preftune.errors import DataError

HH_FILES = ["helpful-base/test.jsonl.gz", "harmless-base/test.jsonl.gz"]
PANDALM = SHARED_DATA / "pandalm-testset" / "testset-v1.json"
MARKER = "\n\nAssistant:"

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA}")


def _locations(path: Path, indices: list[int], *, one_based: bool) -> list[str]:
    return [f"{path}:{i + 1 if one_based else i}" for i in indices[:MAX_EXAMPLES]]


# --------------------------------------------------------------------------- HH-RLHF
def _hh_expected(path: Path) -> dict:
    """Findings for an HH file, straight from the raw lines (indices are 0-based lines)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    found: dict[str, list[int]] = {k: [] for k in (
        "identical_pairs", "blank_chosen", "blank_rejected", "prompt_mismatch", "duplicate_prompts",
        "fake_turn_in_completion", "blank_prompt", "duplicate_pairs", "contradictory_pairs")}
    prompts_seen: set[str] = set()
    pairs_seen: set[tuple[str, str, str]] = set()
    kept: list[tuple[int, str, str, str]] = []
    for i, record in enumerate(raw):
        chosen, rejected = record["chosen"], record["rejected"]
        # the edge_cases.json definition of the prompt of one transcript
        chosen_prompt = chosen[: chosen.rfind(MARKER) + len(MARKER)]
        rejected_prompt = rejected[: rejected.rfind(MARKER) + len(MARKER)]
        if chosen_prompt != rejected_prompt:
            found["prompt_mismatch"].append(i)
        prompt = chosen_prompt if len(chosen_prompt) <= len(rejected_prompt) else rejected_prompt
        assert chosen.startswith(prompt) and rejected.startswith(prompt)  # no real divergence here
        completions = (chosen[len(prompt):], rejected[len(prompt):])
        if any("Human:" in c or "Assistant:" in c for c in completions):
            found["fake_turn_in_completion"].append(i)
        if completions[0] == completions[1]:
            found["identical_pairs"].append(i)
            continue  # dropped: takes no further part
        if completions[0].strip() == "":
            found["blank_chosen"].append(i)
        if completions[1].strip() == "":
            found["blank_rejected"].append(i)
        if prompt.strip() == "":
            found["blank_prompt"].append(i)
        if prompt in prompts_seen:
            found["duplicate_prompts"].append(i)
        prompts_seen.add(prompt)
        if (prompt, *completions) in pairs_seen:
            found["duplicate_pairs"].append(i)
        elif (prompt, completions[1], completions[0]) in pairs_seen:
            found["contradictory_pairs"].append(i)
        pairs_seen.add((prompt, *completions))
        kept.append((i, prompt, *completions))
    return {"raw": raw, "found": found, "kept": kept}


@pytest.fixture(scope="module")
def edge_cases() -> dict:
    return json.loads((SHARED_DATA / "hh-rlhf" / "edge_cases.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", HH_FILES)
def test_hh_report_equals_independent_counts(name: str, edge_cases: dict) -> None:
    path = SHARED_DATA / "hh-rlhf" / name
    expected = _hh_expected(path)
    result = load_examples(path)  # on_error="error": no record in these files is malformed
    report = result.report
    found = expected["found"]

    assert report.format == "hh"
    assert report.records == len(expected["raw"]) == edge_cases[name]["records"]
    assert report.kept == len(result.examples) == len(expected["kept"])
    assert report.dropped == ({"identical_pairs": len(found["identical_pairs"])} if found["identical_pairs"] else {})
    assert report.records == report.kept + sum(report.dropped.values())
    for finding, indices in found.items():
        assert report.findings[finding] == len(indices), finding
        if indices:
            assert report.examples[finding] == _locations(path, indices, one_based=True), finding
    for finding in ("ties", "non_string", "blank_completion", "blank_instruction"):
        assert report.findings[finding] == 0

    # Every kept example splits its record losslessly: prompt + completion == the transcript.
    for example, (i, prompt, chosen, rejected) in zip(result.examples, expected["kept"], strict=True):
        assert example.source == f"{path}:{i + 1}"
        assert (example.prompt, example.chosen, example.rejected) == (prompt, chosen, rejected)
        raw = expected["raw"][i]
        assert example.prompt + example.chosen == raw["chosen"]
        assert example.prompt + example.rejected == raw["rejected"]


@pytest.mark.parametrize("name", HH_FILES)
def test_hh_agrees_with_edge_cases_json(name: str, edge_cases: dict) -> None:
    path = SHARED_DATA / "hh-rlhf" / name
    cases = edge_cases[name]["edge_cases"]
    found = _hh_expected(path)["found"]
    report = load_examples(path).report
    # Same definitions: identical pairs, prompt mismatch (P(chosen) != P(rejected)), blanks.
    assert found["identical_pairs"] == cases["chosen_eq_rejected"]["indices"]
    assert report.findings["identical_pairs"] == cases["chosen_eq_rejected"]["count"]
    assert found["prompt_mismatch"] == cases["P_chosen_ne_P_rejected"]["indices"]
    assert report.findings["prompt_mismatch"] == cases["P_chosen_ne_P_rejected"]["count"]
    assert found["blank_chosen"] == cases["chosen_final_blank"]["indices"]
    assert report.findings["blank_chosen"] == cases["chosen_final_blank"]["count"]
    assert found["blank_rejected"] == cases["rejected_final_blank"]["indices"]
    assert report.findings["blank_rejected"] == cases["rejected_final_blank"]["count"]
    # Duplicates: edge_cases lists EVERY record of a duplicated prompt; we count the repeats
    # (each record after the first of its prompt), so ours are the later members of its groups.
    members = cases["duplicate_prompt_records"]["indices"]
    repeats = edge_cases[name]["records"] - edge_cases[name]["distinct_P_chosen"]
    assert report.findings["duplicate_prompts"] == repeats == len(found["duplicate_prompts"])
    assert set(found["duplicate_prompts"]) <= set(members)
    # A fake "Human:" turn in a final response (edge_cases) is one of our fake-turn findings.
    human = set(cases["final_response_contains_Human_colon_chosen"]["indices"])
    human |= set(cases["final_response_contains_Human_colon_rejected"]["indices"])
    assert human <= set(found["fake_turn_in_completion"])


def test_hh_numbers_named_in_the_brief(edge_cases: dict) -> None:
    """The counts the data's own documentation gives, as the report shows them."""
    helpful = load_examples(SHARED_DATA / "hh-rlhf" / HH_FILES[0]).report
    harmless = load_examples(SHARED_DATA / "hh-rlhf" / HH_FILES[1]).report
    assert (helpful.findings["identical_pairs"], harmless.findings["identical_pairs"]) == (2, 0)
    assert (helpful.findings["prompt_mismatch"], harmless.findings["prompt_mismatch"]) == (9, 5)
    assert (helpful.findings["blank_rejected"], harmless.findings["blank_chosen"]) == (4, 4)
    # harmless: 4 records in duplicate groups (edge_cases' count), 2 of them repeats (ours)
    assert edge_cases[HH_FILES[1]]["edge_cases"]["duplicate_prompt_records"]["count"] == 4
    assert harmless.findings["duplicate_prompts"] == 2


def test_two_hh_files_in_one_load() -> None:
    paths = [SHARED_DATA / "hh-rlhf" / name for name in HH_FILES]
    both = load_examples(paths).report
    alone = [load_examples(p).report for p in paths]
    assert both.records == sum(r.records for r in alone)
    assert both.kept == sum(r.kept for r in alone)
    # the two test splits share no prompt, so duplicates add up too
    assert both.findings["duplicate_prompts"] == sum(r.findings["duplicate_prompts"] for r in alone)


# --------------------------------------------------------------------------- PandaLM
TEXT_FIELDS = ("instruction", "input", "response1", "response2")


def _pandalm_expected() -> dict:
    raw = json.loads(PANDALM.read_text(encoding="utf-8"))
    found: dict[str, list[int]] = {k: [] for k in (
        "non_string", "ties", "identical_pairs", "blank_chosen", "blank_rejected", "duplicate_prompts",
        "blank_instruction", "blank_prompt", "duplicate_pairs", "contradictory_pairs")}
    kept: dict[int, tuple[str, str, str, float]] = {}
    seen: set[str] = set()
    pairs_seen: set[tuple[str, str, str]] = set()
    for i, record in enumerate(raw):
        if any(not isinstance(record[k], str) for k in TEXT_FIELDS):
            found["non_string"].append(i)
            continue
        votes = [record[k] for k in sorted(record) if k.startswith("annotator")]
        ranked = Counter(votes).most_common()
        top_label, top_count = ranked[0]
        clear = len(ranked) == 1 or ranked[1][1] < top_count
        if top_label == 0 or not clear:
            found["ties"].append(i)
            continue
        loser = 3 - top_label
        chosen, rejected = record[f"response{top_label}"], record[f"response{loser}"]
        preference = top_count / (top_count + votes.count(loser))
        if chosen == rejected:
            found["identical_pairs"].append(i)
            continue
        prompt = record["instruction"] + ("\n\n" + record["input"] if record["input"] else "")
        if chosen.strip() == "":
            found["blank_chosen"].append(i)
        if rejected.strip() == "":
            found["blank_rejected"].append(i)
        if record["instruction"].strip() == "":
            found["blank_instruction"].append(i)
        if prompt.strip() == "":
            found["blank_prompt"].append(i)
        if prompt in seen:
            found["duplicate_prompts"].append(i)
        seen.add(prompt)
        if (prompt, chosen, rejected) in pairs_seen:
            found["duplicate_pairs"].append(i)
        elif (prompt, rejected, chosen) in pairs_seen:
            found["contradictory_pairs"].append(i)
        pairs_seen.add((prompt, chosen, rejected))
        kept[i] = (prompt, chosen, rejected, preference)
    return {"raw": raw, "found": found, "kept": kept}


def test_pandalm_stops_at_the_first_non_string_response() -> None:
    raw = json.loads(PANDALM.read_text(encoding="utf-8"))
    index, field = next((i, k) for i, r in enumerate(raw) for k in TEXT_FIELDS if not isinstance(r[k], str))
    with pytest.raises(DataError) as err:
        load_examples(PANDALM)
    assert (err.value.record, err.value.field, err.value.reason) == (index, field, "non_string")
    assert str(err.value).startswith(f"{PANDALM}, record {index}, field '{field}': must be text, got bool True")


def test_pandalm_report_equals_independent_counts() -> None:
    expected = _pandalm_expected()
    found = expected["found"]
    result = load_examples(PANDALM, on_error="skip")
    report = result.report

    assert report.format == "votes"
    assert report.records == len(expected["raw"])
    assert report.kept == len(result.examples) == len(expected["kept"])
    expected_dropped = {k: len(found[k]) for k in ("non_string", "ties", "identical_pairs") if found[k]}
    assert report.dropped == expected_dropped
    assert report.records == report.kept + sum(report.dropped.values())
    for finding, indices in found.items():
        assert report.findings[finding] == len(indices), finding
        if indices:
            assert report.examples[finding] == _locations(PANDALM, indices, one_based=False), finding
    assert report.findings["prompt_mismatch"] == report.findings["fake_turn_in_completion"] == 0

    # Each kept example is the majority's pair, with the winner's share of non-tie votes.
    for example in result.examples:
        index = int(example.source.rsplit(":", 1)[1])
        prompt, chosen, rejected, preference = expected["kept"][index]
        assert (example.prompt, example.chosen, example.rejected) == (prompt, chosen, rejected)
        assert example.preference == pytest.approx(preference)


def test_pandalm_oddities_named_in_its_readme_are_all_seen() -> None:
    """The README's list (ties, 2-1 splits, `true`, winning empty responses, a blank
    instruction, shared prompts): each is present, and counted."""
    result = load_examples(PANDALM, on_error="skip")
    findings = result.report.findings
    assert findings["ties"] > 0 and findings["non_string"] > 0 and findings["duplicate_prompts"] > 0
    assert findings["blank_chosen"] > 0 and findings["blank_rejected"] > 0  # empty ones win and lose
    assert findings["blank_instruction"] == 1
    # several models wrote the same answer, so the same pair is judged again (and again)
    assert findings["duplicate_pairs"] > 0
    soft = Counter(round(e.preference, 3) for e in result.examples)
    raw = json.loads(PANDALM.read_text(encoding="utf-8"))
    split_2_1 = sum(
        1
        for r in raw
        if all(isinstance(r[k], str) for k in TEXT_FIELDS)
        and sorted((r["annotator1"], r["annotator2"], r["annotator3"])) in ([1, 1, 2], [1, 2, 2])
    )
    assert soft[0.667] == split_2_1 > 0
    assert set(soft) == {1.0, 0.667}


# --------------------------------------------------------------------------- data inspect, as a user runs it
def _raw_count(path: Path) -> int:
    if path.name.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())
    return len(json.loads(path.read_text(encoding="utf-8")))


@pytest.mark.parametrize("name", [*(f"hh-rlhf/{n}" for n in HH_FILES), "pandalm-testset/testset-v1.json"])
def test_data_inspect_reports_the_whole_file_without_on_error(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Read in place, no --on-error: every record is checked and counted, and the exit status says
    whether training (data.on_error: error) would accept the file as it is."""
    from preftune.cli.main import main

    path = SHARED_DATA / name
    code = main(["data", "inspect", str(path), "--json"])
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["records"] == _raw_count(path)
    assert summary["records"] == summary["kept"] + sum(summary["dropped"].values())
    malformed = summary["dropped"].get("non_string", 0)
    assert code == (1 if malformed else 0), captured.err
    if name.startswith("pandalm"):  # its six non-string responses are all counted, not just the first
        assert malformed == 6 and "6 malformed record(s)" in captured.err

"""The demo: its embedded task, and a reduced run of the whole pipeline from the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import run_cli
from preftune.demo import task


def test_corpus_is_grammatical_and_seeded() -> None:
    reviews = task.corpus(500, seed=3)
    assert reviews == task.corpus(500, seed=3) and reviews != task.corpus(500, seed=4)
    assert all(task.well_formed("", " " + r) for r in reviews)
    rng = random.Random(0)
    for text in reviews[:50]:
        prompt, continuation = task.split_opening(text, rng)
        assert prompt + continuation == text and continuation.startswith(" ")
        assert task.well_formed(prompt, continuation)


def test_ground_truth_reward_counts_words_and_penalises_broken_text() -> None:
    assert task.sentiment(" was great and the plot was dull . i loved it .") == 1 + 1 - 1
    assert task.reward("the movie", " was great . i loved it .") == 2
    assert task.reward("the movie", " was great . i loved") == -2  # not ended: no credit, 2 off
    assert task.reward("the movie", " was bad bad . i hated it .") == -3 - 2  # ungrammatical: min(-3, 0) - 2
    assert not task.well_formed("the movie", " was great . i loved it . the")


def test_pairs_are_best_against_worst_and_ties_are_counted() -> None:
    from preftune.demo.pipeline import label_pairs

    pairs, ties = label_pairs(
        ["the plot", "the film"],
        [[" was dull . i hated it .", " was great . i loved it .", " was fun . i liked it ."],
         [" was long . i liked it .", " was long . i liked it ."]],
    )
    assert ties == 1
    assert pairs == [{"prompt": "the plot", "chosen": " was great . i loved it .", "rejected": " was dull . i hated it ."}]


@pytest.mark.full
@pytest.mark.slow
def test_reduced_demo_aligns_the_policy(tmp_path: Path) -> None:
    """The reduced demo, with a second round of iterative DPO (``--rounds 2``): round 1 is the
    demo's usual DPO run (the same code path and numbers as without ``--rounds``)."""
    out = tmp_path / "demo"
    result = run_cli("demo", "--quick", "--rounds", "2", "--out", str(out), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    policy, reference = summary["policies"][0], summary["reference"]
    assert policy["ground_truth_reward"] > reference["ground_truth_reward"] + 0.5, summary
    assert policy["win_rate_ground_truth"]["win_rate"] > 0.5
    assert policy["kl_to_reference"]["mean"] > 0
    for folder in ("base", "sft", "rm", "dpo"):
        assert (out / folder).is_dir(), folder
    assert (out / "dpo" / "final" / "model.safetensors").is_file()
    assert "win rate, ground truth" in result.stdout and "demo wall time" in result.stdout
    # the second round, trained from the first round's policy on its own samples, shown beside it
    assert [p.get("label") for p in summary["policies"]] == ["DPO round 1", "DPO round 2"]
    second = summary["policies"][1]
    assert second["path"].endswith("dpo-round-2/final") and (out / "pairs" / "round-2-train.jsonl").is_file()
    assert second["ground_truth_reward"] > reference["ground_truth_reward"] + 0.5 and second["kl_to_reference"]["mean"] > 0
    assert "DPO round 1" in result.stdout and "DPO round 2" in result.stdout
    assert "DPO round 2" in (out / "report.html").read_text()

"""eval/judges.py: function and reward-model judges, the win rate and its Wilson interval, clean errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_judges_module
from preftune.errors import PreftuneError
from preftune.eval.judges import (
    Judge,
    function_judge,
    reward_model_judge,
    wilson_interval,
    win_rate,
)


@pytest.fixture
def judges_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The judge functions of conftest.JUDGES, importable as ``my_judges``."""
    monkeypatch.syspath_prepend(str(tmp_path))
    return write_judges_module(tmp_path)


def test_a_judge_that_always_prefers_the_policy_gives_win_rate_1(judges_module: Path) -> None:
    prompts, policy, ref = ["p1", "p2", "p3", "p4"], ["a", "bbbb", "ccc", "d"], ["xx", "y", "zzz", "ww"]
    out = win_rate(prompts, policy, ref, function_judge("my_judges:always_policy"))
    assert (out["win_rate"], out["wins"], out["losses"], out["ties"], out["n"]) == (1.0, 4, 0, 0, 4)
    low, high = out["ci95"]
    assert high == pytest.approx(1.0) and 0.4 < low < 1.0
    assert out["mean_len_policy"] == 2.25 and out["mean_len_reference"] == 2.0
    ties = win_rate(prompts, policy, ref, function_judge(f"{judges_module}:tie"))  # a file path works too
    assert (ties["win_rate"], ties["ties"], ties["wins"]) == (0.5, 4, 0)
    longer = win_rate(prompts, policy, ref, function_judge("my_judges:longer"))  # bools; the length check sees it
    assert longer["win_rate"] == 0.25 and longer["longer_wins"] == 1.0


def test_wilson_interval_golden_values() -> None:
    # 8 of 10: Wilson (1927) score interval at 95%, as tabulated (e.g. Brown, Cai, DasGupta 2001)
    low, high = wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    low, high = wilson_interval(0, 5)
    assert low == 0.0 and high == pytest.approx(0.4345, abs=1e-4)


@pytest.mark.parametrize("spec,message", [
    ("no_colon", "'module:function'"),
    ("my_judges:", "'module:function'"),
    ("my_judges:bad name", "'module:function'"),
    ("no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
    ("missing_file.py:f", "does not exist"),
    ("my_judges:absent", "has no attribute 'absent'"),
    ("my_judges:NOT_A_FUNCTION", "not a function"),
    ("my_judges:one_arg", "three arguments"),
])
def test_bad_judge_specs_are_clean_errors(judges_module: Path, spec: str, message: str) -> None:
    with pytest.raises(PreftuneError, match=message):
        function_judge(spec)


def test_bad_judge_results_are_clean_errors(judges_module: Path) -> None:
    with pytest.raises(PreftuneError, match=r"returned 2 on comparison 0"):
        win_rate(["p"], ["a"], ["b"], function_judge("my_judges:two"))
    with pytest.raises(PreftuneError, match="raised RuntimeError on comparison 0: judge broke"):
        win_rate(["p"], ["a"], ["b"], function_judge("my_judges:boom"))


def test_reward_model_judge_prefers_the_higher_reward(tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    from preftune.models.reward import RewardModel, save_reward_model, score_responses
    from preftune.models.tiny import tiny_llama

    save_reward_model(RewardModel(tiny_llama(tokenizer, seed=3)), tokenizer, tmp_path / "rm")
    judge = reward_model_judge(tmp_path / "rm", batch_size=3)
    assert isinstance(judge, Judge) and judge.score is not None
    prompts = ["the a of", "to and in", "be an", "of with"]
    policy, ref = [" good great", " fine", " calm clear", " kind"], [" bad", " awful poor", " sad", " dark cold"]
    out = win_rate(prompts, policy, ref, judge)
    from preftune.models.reward import load_reward_model

    model, tok = load_reward_model(tmp_path / "rm")
    a, b = score_responses(model, tok, prompts, policy), score_responses(model, tok, prompts, ref)
    assert out["wins"] == sum(x > y for x, y in zip(a, b)) and out["losses"] == sum(x < y for x, y in zip(a, b))
    assert out["reward_policy"] == pytest.approx(sum(a) / 4, abs=1e-5)
    same = win_rate(prompts, policy, policy, judge)
    assert same["ties"] == 4 and same["win_rate"] == 0.5

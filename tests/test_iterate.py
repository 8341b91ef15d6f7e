"""`preftune iterate`: pair-building rules, the shipped config through the CLI (the judge's score
rises round to round), and an iteration killed inside a round that resumes to the same end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, assert_same_weights, start_cli, weights
from preftune.errors import ConfigError, PreftuneError
from preftune.stages.pairing import build_pairs
from preftune.training.checkpoint import latest_checkpoint

ITERATE_TINY = REPO / "configs" / "iterate-tiny.yaml"


# --------------------------------------------------------------------------- pairing rules
def test_best_against_worst_makes_one_pair_per_prompt() -> None:
    pairs, counts = build_pairs(["p", "q"], [["a", "b", "c"], ["x", "y"]], [[1.0, 3.0, 2.0], [0.5, -1.0]])
    assert [(r["chosen"], r["rejected"]) for r in pairs] == [("b", "a"), ("x", "y")]
    assert pairs[0]["score_chosen"] == 3.0 and pairs[0]["score_rejected"] == 1.0
    assert counts.pairs == 2 and counts.prompts_paired == 2 and counts.ties == 0


def test_gap_rule_takes_every_pair_above_the_gap_and_counts_the_rest() -> None:
    pairs, counts = build_pairs(["p"], [["a", "b", "c", "d"]], [[0.0, 1.0, 1.0, 3.0]], rule="gap", min_gap=1.0)
    made = sorted((r["chosen"], r["rejected"]) for r in pairs)
    assert made == [("d", "a"), ("d", "b"), ("d", "c")]  # 3-0, 3-1, 3-1 are above 1; 1-0 (twice) is not
    assert counts.below_gap == 2 and counts.ties == 1 and counts.pairs == 3  # b-c tie dropped and counted


def test_ties_single_samples_and_all_equal_prompts_are_dropped_and_counted() -> None:
    pairs, counts = build_pairs(["one", "same", "ok"], [["a"], ["x", "y", "z"], ["u", "v"]], [[1.0], [2.0, 2.0, 2.0], [1.0, 0.0]],
                                systems=[None, None, "be nice"])
    assert [(r["prompt"], r["chosen"], r["system"]) for r in pairs] == [("ok", "u", "be nice")]
    assert counts.single == 1 and counts.all_equal == 1 and counts.ties == 1 and counts.pairs == 1 and counts.prompts == 3
    _, gap_counts = build_pairs(["same"], [["x", "y", "z"]], [[2.0, 2.0, 2.0]], rule="gap")
    assert gap_counts.ties == 3 and gap_counts.all_equal == 1  # every one of the three candidate pairs ties


def test_best_worst_below_the_gap_is_counted() -> None:
    pairs, counts = build_pairs(["p"], [["a", "b"]], [[1.0, 1.5]], min_gap=0.5)
    assert pairs == [] and counts.below_gap == 1


def test_bad_pairing_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="not known"):
        build_pairs([], [], [], rule="best")
    with pytest.raises(ConfigError, match="min_gap"):
        build_pairs([], [], [], min_gap=-1)


# --------------------------------------------------------------------------- the judge
def test_a_scoring_judge_must_return_finite_numbers(tmp_path: Path) -> None:
    from preftune.eval.scoring import function_scorer

    (tmp_path / "judge_mod.py").write_text("def nan(p, c):\n    return float('nan')\n\ndef three(p, a, b):\n    return 1\n")
    with pytest.raises(PreftuneError, match="finite number"):
        function_scorer(f"{tmp_path / 'judge_mod.py'}:nan").score(["p"], ["c"])
    with pytest.raises(PreftuneError, match="two arguments"):
        function_scorer(f"{tmp_path / 'judge_mod.py'}:three")


def test_iterate_config_errors_name_the_setting(tiny_model_dir: Path, preference_files: tuple[Path, Path]) -> None:
    from preftune.stages.iterate_config import load_iterate_config

    train, held = preference_files
    base = [f"--model.path={tiny_model_dir}", f"--iterate.prompts={train}", f"--iterate.eval_prompts={held}"]
    with pytest.raises(ConfigError, match="num_samples must be at least 2"):
        load_iterate_config(ITERATE_TINY, base + ["--generate.num_samples=1"])
    with pytest.raises(ConfigError, match="exactly one judge"):
        load_iterate_config(ITERATE_TINY, base + [f"--iterate.reward_model={tiny_model_dir}"])
    with pytest.raises(ConfigError, match="data.train must be empty"):
        load_iterate_config(ITERATE_TINY, base + [f"--data.train={train}"])


# --------------------------------------------------------------------------- end to end
def _cli(*args: str, **popen: object) -> subprocess.Popen:
    return start_cli(*args, cwd=REPO, **popen)


def _iterate_args(model: Path, train: Path, held: Path, out: Path, *extra: str) -> list[str]:
    return ["iterate", str(ITERATE_TINY), f"--model.path={model}", f"--iterate.prompts={train}", f"--iterate.eval_prompts={held}",
            f"--train.output_dir={out}", "--train.progress=false", *extra]


@pytest.fixture(scope="module")
def iterated(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped config, two rounds, run through the CLI without interruption."""
    out = tmp_path_factory.mktemp("iterate") / "run"
    proc = _cli(*_iterate_args(tiny_model_dir, *preference_files, out))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "round" in stdout and "judge score" in stdout  # the rounds side by side on the terminal
    return out


@pytest.mark.slow
def test_shipped_config_runs_two_rounds_and_the_judge_score_rises(iterated: Path) -> None:
    summary = json.loads((iterated / "iterate.json").read_text())
    scores = [summary["initial"]["judge_score"]["mean"]] + [r["judge_score"]["mean"] for r in summary["rounds"]]
    assert len(scores) == 3
    assert scores[2] > scores[1] > scores[0], scores  # held-out prompts, the function judge
    second = summary["rounds"][1]
    assert second["reference"] == summary["initial"]["path"]  # iterate.reference: initial
    assert second["policy"].endswith("round-2/final") and second["win_rate_vs_initial"]["win_rate"] > 0.5
    assert second["kl_to_initial"]["mean"] > summary["rounds"][0]["kl_to_initial"]["mean"]
    for n in (1, 2):
        folder = iterated / f"round-{n}"
        assert (folder / "final" / "model.safetensors").is_file() and (folder / "metrics.jsonl").is_file()
        pairs = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
        assert pairs and all(p["score_chosen"] > p["score_rejected"] for p in pairs)
        assert json.loads((folder / "pairing.json").read_text())["pairs"] == len(pairs)
    # round 2 trained from round 1's policy
    assert json.loads((iterated / "round-2" / "round.json").read_text())["pairing"]["prompts"] == 64
    report = (iterated / "report.html").read_text()
    assert "Rounds" in report and "0 (initial)" in report and "data:image/png;base64," in report
    from preftune.cli.main import main

    (iterated / "report.html").unlink()
    assert main(["report", str(iterated)]) == 0  # `preftune report` knows an iteration's folder
    assert (iterated / "plots" / "judge_by_round.png").is_file() and "Rounds" in (iterated / "report.html").read_text()


@pytest.mark.full
@pytest.mark.slow
def test_a_killed_iteration_resumes_and_ends_as_an_uninterrupted_one(
        iterated: Path, tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    from preftune.stages import iterate
    from preftune.stages.iterate_config import load_iterate_config

    out = tmp_path / "run"
    args = _iterate_args(tiny_model_dir, *preference_files, out)
    # Killed between rounds: the folder as the uninterrupted run left it after round 1.
    out.mkdir()
    for name in ("config.yaml", "initial.json", "iterate.json", "round-1"):
        source = iterated / name
        shutil.copytree(source, out / name) if source.is_dir() else shutil.copy2(source, out / name)
    (out / "round-1" / "round.json").write_text((iterated / "round-1" / "round.json").read_text().replace(str(iterated), str(out)))
    with pytest.raises(PreftuneError, match="train.resume_from=latest"):  # never overwritten by accident
        iterate.run(load_iterate_config(ITERATE_TINY, args[2:]))
    with pytest.raises(ConfigError, match="changed: loss.beta"):  # continued only with the settings it began with
        iterate.run(load_iterate_config(ITERATE_TINY, args[2:] + ["--train.resume_from=latest", "--loss.beta=0.2"]))
    round_one = (out / "round-1" / "round.json").read_text()
    samples_mtime = (out / "round-1" / "samples.jsonl").stat().st_mtime_ns

    # ... then killed again inside round 2's DPO run, after its first checkpoint.
    proc = _cli(*args, "--train.resume_from=latest", start_new_session=True)
    deadline = time.time() + 300
    while latest_checkpoint(out / "round-2") is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    _, stderr = proc.communicate()
    assert "round 1/2" not in stderr  # a finished round is not redone
    assert not (out / "round-2" / "round.json").exists(), "the run finished round 2 before it could be killed"
    assert latest_checkpoint(out / "round-2") is not None

    resumed = _cli(*args, "--train.resume_from=latest")
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    assert "round 2: resuming its DPO run from" in stderr and "round 1/2" not in stderr
    assert (out / "round-1" / "round.json").read_text() == round_one
    assert (out / "round-1" / "samples.jsonl").stat().st_mtime_ns == samples_mtime
    for n in (1, 2):
        assert_same_weights(weights(out / f"round-{n}" / "final"), weights(iterated / f"round-{n}" / "final"), atol=1e-6)
    ours, theirs = (json.loads((d / "iterate.json").read_text()) for d in (out, iterated))
    assert [r["judge_score"] for r in ours["rounds"]] == [r["judge_score"] for r in theirs["rounds"]]
    assert [r["steps"] for r in ours["rounds"]] == [16, 16]


# --------------------------------------------------------------------------- the Python API
@pytest.mark.slow
def test_the_python_api_takes_a_judge_function_and_equals_the_cli(
        iterated: Path, tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    import yaml

    import preftune
    from preftune.models.tiny import good_words_score

    train, held = preference_files
    calls: list[str] = []

    def judge(prompt: object, completion: str) -> float:  # a closure: only the Python API can take one
        calls.append(completion)
        return good_words_score(prompt, completion)

    out = tmp_path / "run"
    common = {"model": tiny_model_dir, "prompts": [str(train)], "eval_prompts": [str(held)]}
    first = preftune.iterate(ITERATE_TINY, judge=judge, rounds=1, train={"output_dir": str(out), "progress": False}, **common)
    assert isinstance(first, preftune.IterationResult) and first.run_dir == out
    assert first.model_path == out / "round-1" / "final" and calls
    recorded = yaml.safe_load((out / "config.yaml").read_text())["iterate"]["judge"]
    assert recorded.endswith(":test_the_python_api_takes_a_judge_function_and_equals_the_cli.<locals>.judge")
    # the same run as the CLI's with the judge named in the YAML: same scores, same weights
    cli = json.loads((iterated / "iterate.json").read_text())
    assert first.initial["judge_score"] == cli["initial"]["judge_score"]
    assert first.rounds[0]["judge_score"] == cli["rounds"][0]["judge_score"]
    assert_same_weights(weights(first.model_path), weights(iterated / "round-1" / "final"), atol=1e-6)

    # continued for a second round with the same function; another function is a changed setting
    with pytest.raises(ConfigError, match="changed: iterate.judge"):
        preftune.iterate(ITERATE_TINY, judge=good_words_score, rounds=2,
                         train={"output_dir": str(out), "progress": False, "resume_from": "latest"}, **common)
    more = preftune.iterate(ITERATE_TINY, judge=judge, rounds=2,
                            train={"output_dir": str(out), "progress": False, "resume_from": "latest"}, **common)
    assert len(more.rounds) == 2 and more.rounds[0] == first.rounds[0]
    assert more.rounds[1]["judge_score"] == cli["rounds"][1]["judge_score"]
    assert_same_weights(weights(more.model_path), weights(iterated / "round-2" / "final"), atol=1e-6)


def test_the_python_api_refuses_a_bad_judge(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    import preftune

    train, held = preference_files
    common = {"model": tiny_model_dir, "prompts": [str(train)], "eval_prompts": [str(held)],
              "train": {"output_dir": str(tmp_path / "run")}}
    with pytest.raises(PreftuneError, match="must accept two arguments"):
        preftune.iterate(ITERATE_TINY, judge=lambda text: 1.0, **common)
    with pytest.raises(ConfigError, match="exactly one judge"):
        preftune.iterate(ITERATE_TINY, judge=lambda p, c: 1.0, iterate={"reward_model": str(tiny_model_dir)}, **common)
    with pytest.raises(ConfigError, match="IterateConfig or a YAML file"):
        preftune.iterate(preftune.DPOConfig(), judge=lambda p, c: 1.0, **common)
    with pytest.raises(ConfigError, match="several sections"):
        preftune.iterate(ITERATE_TINY, judge=lambda p, c: 1.0, progress=False, **common)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def _factory(bonus: float):  # noqa: ANN202 - closures of one factory share a name, module:_factory.<locals>.judge
    def judge(prompt: object, completion: str) -> float:
        return len(completion) + bonus

    return judge


def test_a_resumed_iteration_refuses_another_judge_with_the_same_name(preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    """Another closure of the same factory, or another lambda, has the same module:qualname; its code and
    closure values tell it apart (checked before any model is loaded)."""
    import preftune
    from preftune.eval.scoring import function_fingerprint

    assert function_fingerprint(_factory(1.0)) == function_fingerprint(_factory(1.0))
    assert function_fingerprint(_factory(1.0)) != function_fingerprint(_factory(2.0))
    assert function_fingerprint(lambda p, c: 1.0) != function_fingerprint(lambda p, c: 2.0)
    train, held = preference_files
    out = tmp_path / "run"
    (tmp_path / "no-model").mkdir()  # a folder, empty: a missing one is refused before anything is written
    common = {"model": tmp_path / "no-model", "prompts": [str(train)], "eval_prompts": [str(held)]}
    with pytest.raises(PreftuneError, match="no-model"):  # the iteration starts (config.yaml, judge.json), then finds no model in it
        preftune.iterate(ITERATE_TINY, judge=_factory(1.0), train={"output_dir": str(out), "progress": False}, **common)
    resume = {"output_dir": str(out), "progress": False, "resume_from": "latest"}
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match=r"_factory.<locals>.judge has the same name but other code, defaults or closure values"):
        preftune.iterate(ITERATE_TINY, judge=_factory(2.0), train=resume, **common)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    with pytest.raises(PreftuneError, match="no-model"):  # the same judge again: accepted
        preftune.iterate(ITERATE_TINY, judge=_factory(1.0), train=resume, **common)


def test_a_typo_in_the_judge_name_leaves_nothing_behind(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    """`preftune iterate` loads the judge before it writes: the corrected command then runs (here: gets as far as the same check)."""
    from preftune.cli.main import main

    out = tmp_path / "run"
    args = _iterate_args(tiny_model_dir, *preference_files, out)
    assert main([*args, "--iterate.judge=preftune.models.tiny:good_wrods_score"]) == 2
    assert not out.exists()

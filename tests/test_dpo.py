"""The DPO stage end to end on a tiny model: the CLI run, reference-free losses and bad combinations, prefix sharing.

The loop's invariants (accumulation, resume, non-finite losses) are in test_train.py, the
reference strategies in test_reference.py, the CLI's errors in test_cli.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import DPO_TINY, assert_same_weights, dpo_config, read_metrics, run_cli, weights
from preftune.errors import PreftuneError
from preftune.stages.dpo import run as run_dpo


@pytest.mark.full
def test_cli_run_learns_and_writes_the_run_folder(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    train, held = preference_files
    run = tmp_path / "run"
    result = run_cli("dpo", str(DPO_TINY), f"--model.path={tiny_model_dir}", f"--data.train={train}", f"--data.eval={held}",
                     f"--train.output_dir={run}", "--train.progress=false")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("config.yaml", "data_report.json", "reference.json", "metrics.jsonl", "report.html"):
        assert (run / name).is_file(), name
    metrics = read_metrics(run)
    train_lines = [m for m in metrics if "loss" in m]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert key in train_lines[0], key
    evals = [m for m in metrics if "eval/rewards/accuracies" in m]
    assert len(evals) == 3  # steps 10 and 20, and the end
    # The reference is the start point, so the first train loss is log 2 and held-out accuracy
    # rises well above chance as the policy learns the rule.
    assert train_lines[0]["step"] == 5
    assert evals[-1]["eval/rewards/accuracies"] >= 0.9, evals
    assert evals[-1]["eval/loss"] < 0.6931
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-10", "step-20", "step-30"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(run / "final"))
    assert AutoTokenizer.from_pretrained(str(run / "final")).eos_token == "</s>"
    assert model.config.vocab_size > 0
    report = json.loads((run / "data_report.json").read_text())
    assert report["train"]["kept"] == 64 and report["eval"]["kept"] == 32


def test_reference_free_losses_and_bad_combinations(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    train, _ = preference_files
    run = run_dpo(dpo_config(tiny_model_dir, train, None, tmp_path / "simpo", "--loss.name=simpo", "--reference.strategy=auto",
                             "--train.max_steps=2", "--train.save_every=null", "--train.eval_every=null"))
    assert json.loads((run / "reference.json").read_text())["strategy"] == "none"
    with pytest.raises(PreftuneError, match="needs LoRA"):
        run_dpo(dpo_config(tiny_model_dir, train, None, tmp_path / "x", "--reference.strategy=adapter"))
    with pytest.raises(PreftuneError, match="needs a reference model"):
        run_dpo(dpo_config(tiny_model_dir, train, None, tmp_path / "y", "--reference.strategy=none"))
    with pytest.raises(PreftuneError, match="Did you mean 'dpo'"):
        run_dpo(dpo_config(tiny_model_dir, train, None, tmp_path / "z", "--loss.name=dpoo"))


def test_trl_loss_types_and_a_weighted_list_from_the_cli(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """MPO as TRL writes it (loss_type [sigmoid, bco_pair, sft], loss_weights [0.8, 0.2, 1.0]), through the CLI:
    each term is logged under its own name and the loss is their weighted sum; exo_pair under TRL's name."""
    from preftune.cli.main import main

    train, _ = preference_files
    common = ["dpo", str(DPO_TINY), f"--model.path={tiny_model_dir}", f"--data.train={train}", "--data.eval=[]", "--train.progress=false",
              "--train.max_steps=3", "--train.log_every=1", "--train.save_every=null", "--train.eval_every=null", "--train.report=false"]
    run = tmp_path / "mpo"
    assert main([*common, f"--train.output_dir={run}", "--loss.name=[sigmoid, bco_pair, sft]", "--loss.weights=[0.8, 0.2, 1.0]"]) == 0
    lines = [m for m in read_metrics(run) if "loss" in m]
    assert len(lines) == 3
    for m in lines:  # one micro-batch per step: the logged terms are its means, and the loss is their weighted sum
        assert m["loss"] == pytest.approx(0.8 * m["loss/sigmoid"] + 0.2 * m["loss/bco_pair"] + m["loss/sft"], rel=1e-5)
    assert lines[0]["loss/sigmoid"] == pytest.approx(0.6931, abs=1e-3)  # the reference is the start point
    run = tmp_path / "exo"
    assert main([*common, f"--train.output_dir={run}", "--loss.name=exo_pair", "--loss.label_smoothing=0.001"]) == 0
    assert len([m for m in read_metrics(run) if "loss" in m]) == 3
    capsys.readouterr()
    assert main([*common, f"--train.output_dir={tmp_path / 'bad'}", "--loss.name=[dpo, nca_pair]", "--loss.weights=[1.0]"]) == 2
    err = capsys.readouterr().err
    assert "weights has 1 values for 2 losses" in err and "Traceback" not in err


@pytest.mark.fp32_exact
def test_prefix_sharing_trains_like_the_concatenated_layout(
    tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """Same batches, same order: the shared layout's losses and final weights are the plain layout's.

    Also the cache strategy with no eval set (nothing to cache for it) and the layout in reference.json.
    """
    train, _ = preference_files
    common = ["--reference.strategy=cache", f"--reference.cache_dir={tmp_path / 'cache'}", "--data.group_by_length=false",
              "--train.max_steps=4", "--train.lr=1e-3", "--train.log_every=1", "--train.save_every=null", "--train.eval_every=null"]
    runs, losses = {}, {}
    for shared in ("true", "false"):
        runs[shared] = run_dpo(dpo_config(tiny_model_dir, train, None, tmp_path / shared, f"--data.prefix_sharing={shared}", *common))
        losses[shared] = [m["loss"] for m in read_metrics(runs[shared]) if "loss" in m]
    assert len(losses["true"]) == 4
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-5)
    assert_same_weights(weights(runs["true"] / "final"), weights(runs["false"] / "final"), atol=1e-5)
    layouts = [json.loads((runs[s] / "reference.json").read_text())["layout"] for s in ("true", "false")]
    assert layouts == ["prefix_shared", "concatenated"]


def test_wpo_weighting_runs_in_both_layouts_with_the_same_weights(tiny_model_dir: Path, preference_files: tuple[Path, Path],
                                                                   tmp_path: Path) -> None:
    """loss.use_weighting (TRL's use_weighting): each pair's WPO weight is logged, the same from prefix-shared rows
    and from the concatenated batch, and the run trains."""
    from preftune.cli.main import main

    train, _ = preference_files
    logged = {}
    for shared in ("true", "false"):
        run = tmp_path / f"wpo-{shared}"
        assert main(["dpo", str(DPO_TINY), f"--model.path={tiny_model_dir}", f"--data.train={train}", "--data.eval=[]",
                     f"--train.output_dir={run}", "--train.progress=false", "--train.max_steps=3", "--train.log_every=1",
                     "--train.save_every=null", "--train.eval_every=null", "--train.report=false", "--loss.use_weighting=true",
                     f"--data.prefix_sharing={shared}", "--data.group_by_length=false"]) == 0  # the same batches in both layouts
        logged[shared] = [m for m in read_metrics(run) if "loss" in m]
        assert json.loads((run / "reference.json").read_text())["layout"] == ("prefix_shared" if shared == "true" else "concatenated")
    assert len(logged["true"]) == 3
    for a, b in zip(logged["true"], logged["false"]):
        assert 0 < a["wpo_weight"] < float("inf") and a["wpo_weight"] == pytest.approx(b["wpo_weight"], rel=1e-4)
    # the loss is the weighted DPO loss: log 2 times the mean weight at the start point
    first = logged["true"][0]
    assert first["loss"] == pytest.approx(0.693147 * first["wpo_weight"], rel=1e-4)

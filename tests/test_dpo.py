"""DPO end to end on a tiny model: learning, accumulation, exact resume, references, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from preftune.config import DPOConfig, load_config
from preftune.dpo import run_dpo
from preftune.errors import PreftuneError, TrainingError

from conftest import REPO

CONFIG = REPO / "configs" / "dpo-tiny.yaml"


def make_cfg(model_dir: Path, train: Path, held: Path | None, out: Path, *overrides: str) -> DPOConfig:
    base = [f"--model.path={model_dir}", f"--data.train={train}", f"--train.output_dir={out}", "--train.progress=false",
            "--train.report=false"]
    base.append(f"--data.eval={held}" if held else "--data.eval=[]")
    return load_config(DPOConfig, CONFIG, base + list(overrides))


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next((run / "final").glob("*.safetensors"))))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, f"weights differ by {worst}"


def test_cli_run_learns_and_writes_the_run_folder(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    train, held = preference_files
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "preftune.cli", "dpo", str(CONFIG), f"--model.path={tiny_model_dir}",
         f"--data.train={train}", f"--data.eval={held}", f"--train.output_dir={run}", "--train.progress=false"],
        capture_output=True, text=True, timeout=600,
    )
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


@pytest.mark.parametrize("optimizer,atol", [("sgd", 1e-6), ("adamw", 1e-5)])
def test_accumulating_8_micro_batches_of_1_equals_one_batch_of_8(
    tiny_model_dir: Path, tmp_path: Path, optimizer: str, atol: float
) -> None:
    from preftune.tiny import synthetic_preferences

    from conftest import write_jsonl

    data = write_jsonl(tmp_path / "eight.jsonl", synthetic_preferences(8, seed=5))
    common = ["--train.max_steps=2", "--train.save_every=null", "--train.eval_every=null", "--train.max_grad_norm=null",
              "--reference.strategy=copy", "--train.lr=1e-3", f"--train.optimizer={optimizer}"]
    one = run_dpo(make_cfg(tiny_model_dir, data, None, tmp_path / "one", "--train.batch_size=8", "--train.grad_accum=1", *common))
    acc = run_dpo(make_cfg(tiny_model_dir, data, None, tmp_path / "acc", "--train.batch_size=1", "--train.grad_accum=8", *common))
    # With plain SGD the update is lr * gradient, so this checks the accumulated gradient itself.
    # Adam divides by sqrt(v): float rounding in tiny gradients moves a weight by up to ~0.1% of
    # one lr-sized step, so 1e-5 (1% of a step) is its bound.
    assert_same_weights(final_weights(one), final_weights(acc), atol=atol)
    loss_one = [m["loss"] for m in read_metrics(one)]
    loss_acc = [m["loss"] for m in read_metrics(acc)]
    assert loss_one == pytest.approx(loss_acc, abs=1e-6)


class Crash(Exception):
    pass


def test_resume_after_a_crash_ends_with_the_same_weights(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    train, _ = preference_files
    common = ["--train.max_steps=6", "--train.deterministic=true", "--train.save_every=3", "--train.eval_every=null", "--train.batch_size=4",
              "--train.grad_accum=2", "--data.eval=[]", "--train.log_every=1"]
    straight = run_dpo(make_cfg(tiny_model_dir, train, None, tmp_path / "straight", *common))

    calls = {"n": 0}

    def crash_at_step_5(policy: object, reference: object) -> torch.Tensor:
        # an extra loss term that adds nothing, and crashes the run partway through step 5
        calls["n"] += 1
        if calls["n"] == 2 * 4 + 1:
            raise Crash()
        return torch.zeros(())

    with pytest.raises(Crash):
        run_dpo(make_cfg(tiny_model_dir, train, None, tmp_path / "crashed", *common), extra_terms=[crash_at_step_5])
    assert (tmp_path / "crashed" / "checkpoints" / "step-3").is_dir()
    assert not (tmp_path / "crashed" / "final").exists()
    resumed = run_dpo(make_cfg(tiny_model_dir, train, None, tmp_path / "crashed", *common, "--train.resume_from=latest"))
    assert_same_weights(final_weights(straight), final_weights(resumed), atol=0.0)
    # the resumed metrics log continues where the checkpoint left it, with no duplicate steps
    assert [m["step"] for m in read_metrics(resumed)] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in read_metrics(resumed)] == [m["loss"] for m in read_metrics(straight)]


def test_reference_strategies_give_the_same_losses(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    train, held = preference_files
    common = ["--model.lora.enabled=true", "--model.lora.r=4", "--train.max_steps=4", "--train.log_every=1",
              "--train.save_every=null", "--train.eval_every=2", f"--reference.cache_dir={tmp_path / 'cache'}"]
    losses = {}
    for strategy in ("copy", "adapter", "cache"):
        run = run_dpo(make_cfg(tiny_model_dir, train, held, tmp_path / strategy, f"--reference.strategy={strategy}", *common))
        losses[strategy] = [(m["step"], m.get("loss", m.get("eval/loss"))) for m in read_metrics(run)]
        assert (run / "final" / "adapter_config.json").is_file()  # LoRA saves the adapter
    assert losses["copy"][0][1] == pytest.approx(0.693147, abs=1e-5)  # zero-initialised LoRA: policy == reference
    for strategy in ("adapter", "cache"):
        assert [s for s, _ in losses[strategy]] == [s for s, _ in losses["copy"]]
        assert [v for _, v in losses[strategy]] == pytest.approx([v for _, v in losses["copy"]], abs=1e-6), strategy
    assert losses["copy"][-1][1] < losses["copy"][0][1]


def test_reference_cache_is_reused_and_never_stale(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    train, held = preference_files
    cache = tmp_path / "cache"
    common = ["--reference.strategy=cache", f"--reference.cache_dir={cache}", "--train.max_steps=2", "--train.save_every=null", "--train.eval_every=null"]
    first = run_dpo(make_cfg(tiny_model_dir, train, held, tmp_path / "a", *common))
    info = json.loads((first / "reference.json").read_text())
    assert info["train_cache"]["warm"] is False and info["eval_cache"]["warm"] is False
    # a sweep over beta and the loss reuses the same cache
    again = run_dpo(make_cfg(tiny_model_dir, train, held, tmp_path / "b", *common, "--loss.beta=0.5", "--loss.name=ipo"))
    info2 = json.loads((again / "reference.json").read_text())
    assert info2["train_cache"] == {"path": info["train_cache"]["path"], "warm": True}
    # other tokenized data (a shorter max_length cuts completions) gets another key, computed anew
    cut = run_dpo(make_cfg(tiny_model_dir, train, held, tmp_path / "c", *common, "--data.max_length=12", "--data.max_prompt_length=6"))
    info3 = json.loads((cut / "reference.json").read_text())
    assert info3["train_cache"]["warm"] is False and info3["train_cache"]["path"] != info["train_cache"]["path"]
    assert len(list(cache.glob("*.safetensors"))) == 4


def test_non_finite_loss_stops_with_the_step(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    train, _ = preference_files
    calls = {"n": 0}

    def nan_on_third_call(policy: object, reference: object) -> torch.Tensor:
        calls["n"] += 1
        return torch.tensor(float("nan") if calls["n"] == 3 else 0.0)

    cfg = make_cfg(tiny_model_dir, train, None, tmp_path / "nan", "--train.save_every=2", "--train.max_steps=5", "--train.eval_every=null")
    with pytest.raises(TrainingError, match=r"step 3: the loss is nan .*step-2"):
        run_dpo(cfg, extra_terms=[nan_on_third_call])


def test_reference_free_losses_and_bad_combinations(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    train, _ = preference_files
    run = run_dpo(make_cfg(tiny_model_dir, train, None, tmp_path / "simpo", "--loss.name=simpo", "--reference.strategy=auto",
                           "--train.max_steps=2", "--train.save_every=null", "--train.eval_every=null"))
    assert json.loads((run / "reference.json").read_text())["strategy"] == "none"
    with pytest.raises(PreftuneError, match="needs LoRA"):
        run_dpo(make_cfg(tiny_model_dir, train, None, tmp_path / "x", "--reference.strategy=adapter"))
    with pytest.raises(PreftuneError, match="needs a reference model"):
        run_dpo(make_cfg(tiny_model_dir, train, None, tmp_path / "y", "--reference.strategy=none"))
    with pytest.raises(PreftuneError, match="Did you mean 'dpo'"):
        run_dpo(make_cfg(tiny_model_dir, train, None, tmp_path / "z", "--loss.name=dop"))


def test_cli_errors_are_short_and_clean(tmp_path: Path, tiny_model_dir: Path, preference_files: tuple[Path, Path]) -> None:
    train, _ = preference_files
    cases = [
        ([str(CONFIG), "--train.lr=fast"], "'train.lr': expected a number"),
        ([str(CONFIG), "--trian.lr=1"], "Did you mean '--train.lr'"),
        ([str(CONFIG), f"--model.path={tmp_path / 'missing'}", f"--data.train={train}"], "is not a folder"),
    ]
    for args, message in cases:
        result = subprocess.run([sys.executable, "-m", "preftune.cli", "dpo", *args], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        assert "Traceback" not in result.stderr


def test_likelihood_displacement_warns_once() -> None:
    from preftune.train import _DisplacementWatch

    watch = _DisplacementWatch(patience=3)
    with pytest.warns(UserWarning, match="likelihood displacement"):
        for i in range(5):
            watch.update({"logps/chosen": -10.0 - i, "rewards/margins": 0.1 * i}, step=i)
    healthy = _DisplacementWatch(patience=3)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(5):
            healthy.update({"logps/chosen": -10.0 + i, "rewards/margins": 0.1 * i}, step=i)


def test_bf16_autocast_run_then_fp32_run_in_one_process(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    # accelerate's process-wide state once refused a second run with another precision
    train, _ = preference_files
    common = ["--train.max_steps=2", "--train.save_every=null", "--train.eval_every=null"]
    low = run_dpo(make_cfg(tiny_model_dir, train, None, tmp_path / "bf16", "--train.bf16=true", *common))
    full = run_dpo(make_cfg(tiny_model_dir, train, None, tmp_path / "fp32", *common))
    first = [read_metrics(run)[0]["loss"] for run in (low, full)]
    assert first == pytest.approx([0.693147, 0.693147], abs=2e-2)
    assert all(torch.isfinite(torch.tensor(first)))


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
        runs[shared] = run_dpo(make_cfg(tiny_model_dir, train, None, tmp_path / shared, f"--data.prefix_sharing={shared}", *common))
        losses[shared] = [m["loss"] for m in read_metrics(runs[shared]) if "loss" in m]
    assert len(losses["true"]) == 4
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-5)
    assert_same_weights(final_weights(runs["true"]), final_weights(runs["false"]), atol=1e-5)
    layouts = [json.loads((runs[s] / "reference.json").read_text())["layout"] for s in ("true", "false")]
    assert layouts == ["prefix_shared", "concatenated"]

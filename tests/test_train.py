"""train.py: the one loop's invariants, for every stage.

Gradient accumulation is exact (8 micro-batches of 1 give the update of one batch of 8) for a
per-example mean (DPO, reward model) and a per-token mean (SFT, packed or not), with SGD and
AdamW; a run killed and resumed ends with the weights of an uninterrupted one; a non-finite loss
stops before the update; the likelihood-displacement watch warns once; a bf16-autocast run and a
float32 run can follow each other in one process.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

from conftest import REPO, assert_same_weights, dpo_config, read_metrics, weights, write_jsonl
from preftune.config.schema import DPOConfig, RMConfig, SFTConfig, load_config
from preftune.errors import TrainingError
from preftune.stages.dpo import run as run_dpo

CONFIGS = REPO / "configs"
#: Plain SGD: the update is lr * gradient, so equal weights mean equal accumulated gradients.
EXACT = ["--train.max_steps=2", "--train.save_every=null", "--train.eval_every=null", "--train.max_grad_norm=null",
         "--train.optimizer=sgd", "--train.lr=1e-2", "--train.warmup_steps=0", "--train.progress=false", "--train.report=false",
         "--data.eval=[]"]


def one_batch_and_accumulated(stage: str, cls: type, config: str, model_dir: Path, data: Path, tmp_path: Path,
                              *overrides: str) -> tuple[Path, Path]:
    import importlib

    run = importlib.import_module(f"preftune.stages.{stage}").run
    common = [f"--model.path={model_dir}", f"--data.train={data}", *EXACT, *overrides]
    one = run(load_config(cls, CONFIGS / config, [*common, f"--train.output_dir={tmp_path / 'one'}",
                                                    "--train.batch_size=8", "--train.grad_accum=1"]))
    acc = run(load_config(cls, CONFIGS / config, [*common, f"--train.output_dir={tmp_path / 'acc'}",
                                                    "--train.batch_size=1", "--train.grad_accum=8"]))
    return one, acc


@pytest.fixture(scope="module")
def eight_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight pairs whose completions differ in length: a per-micro-batch token mean would not be exact."""
    from preftune.models.tiny import synthetic_preferences

    records = synthetic_preferences(8, seed=5)
    for i, record in enumerate(records):
        record["chosen"] = record["chosen"] + " and so on" * (i % 3)  # lengths 1x, 2x, 3x the phrase
        record["weight"] = 1.0 + (i % 2)  # unequal weights: the weighted mean is over the step's pairs
    return write_jsonl(tmp_path_factory.mktemp("eight") / "eight.jsonl", records)


@pytest.fixture(scope="module")
def eight_demonstrations(eight_pairs: Path) -> Path:
    """The same records without weights: SFT's token mean takes none, and refuses the field."""
    import json

    records = [json.loads(line) for line in eight_pairs.read_text().splitlines()]
    return write_jsonl(eight_pairs.with_name("eight-unweighted.jsonl"), [{k: v for k, v in r.items() if k != "weight"} for r in records])


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.fp32_exact
def test_sft_accumulation_is_exact_for_the_token_mean(tiny_model_dir: Path, eight_demonstrations: Path, tmp_path: Path,
                                                      packing: bool) -> None:
    one, acc = one_batch_and_accumulated("sft", SFTConfig, "sft-tiny.yaml", tiny_model_dir, eight_demonstrations, tmp_path,
                                         f"--sft.packing={str(packing).lower()}", "--data.max_length=40")
    tokens = [m["tokens"] for m in read_metrics(one) if "tokens" in m]
    assert tokens, "the run logged no token counts"
    assert_same_weights(weights(one / "final"), weights(acc / "final"), atol=1e-6)
    assert [m["loss"] for m in read_metrics(one)] == pytest.approx([m["loss"] for m in read_metrics(acc)], abs=1e-6)


def test_sft_micro_batches_hold_different_token_counts(tiny_model_dir: Path, eight_demonstrations: Path) -> None:
    """The data of the accumulation test is one where a mean of per-micro-batch means is wrong."""
    from preftune.data.prepare import prepare
    from preftune.models.tokenizer import load_tokenizer

    cfg = load_config(SFTConfig, CONFIGS / "sft-tiny.yaml", [f"--data.train={eight_demonstrations}", "--data.eval=[]"])
    items = prepare(cfg.data, load_tokenizer(str(tiny_model_dir)), records="demonstrations", seed=0).train
    assert len({len(x.completion_ids) for x in items}) > 1


@pytest.mark.fp32_exact
def test_reward_model_accumulation_is_exact(tiny_model_dir: Path, eight_pairs: Path, tmp_path: Path) -> None:
    # every term on: the weighted Bradley-Terry mean, the chosen-token LM mean and the centring
    one, acc = one_batch_and_accumulated("rm", RMConfig, "rm-tiny.yaml", tiny_model_dir, eight_pairs, tmp_path,
                                         "--loss.lm_weight=0.5", "--loss.center_weight=0.1")
    assert_same_weights(weights(one / "final"), weights(acc / "final"), atol=1e-6)
    assert [m["loss"] for m in read_metrics(one)] == pytest.approx([m["loss"] for m in read_metrics(acc)], abs=1e-6)


@pytest.mark.parametrize("loss", ["dpo", "[rdpo, nca_pair]"])
@pytest.mark.fp32_exact
def test_dpo_accumulation_is_exact_with_weighted_pairs(tiny_model_dir: Path, eight_pairs: Path, tmp_path: Path, loss: str) -> None:
    one, acc = one_batch_and_accumulated("dpo", DPOConfig, "dpo-tiny.yaml", tiny_model_dir, eight_pairs, tmp_path,
                                         "--reference.strategy=copy", f"--loss.name={loss}")
    assert_same_weights(weights(one / "final"), weights(acc / "final"), atol=1e-6)
    assert [m["loss"] for m in read_metrics(one)] == pytest.approx([m["loss"] for m in read_metrics(acc)], abs=1e-6)


@pytest.mark.fp32_exact
def test_a_record_of_weight_zero_trains_as_if_it_were_absent(tiny_model_dir: Path, eight_pairs: Path, tmp_path: Path) -> None:
    """The data's weight field is honoured: weight 0 is exactly no record, and other weights change the update."""
    import json

    records = [json.loads(line) for line in eight_pairs.read_text().splitlines()]
    zeroed = [dict(r, weight=0.0) if i in (1, 6) else r for i, r in enumerate(records)]
    kept = [r for i, r in enumerate(records) if i not in (1, 6)]
    runs = {}
    for name, rows in (("zeroed", zeroed), ("kept", kept), ("all", records)):
        data = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        runs[name] = run_dpo(load_config(DPOConfig, CONFIGS / "dpo-tiny.yaml", [
            f"--model.path={tiny_model_dir}", f"--data.train={data}", *EXACT, f"--train.output_dir={tmp_path / name}",
            "--train.batch_size=8", "--reference.strategy=copy", "--loss.name=bco_pair"]))
    assert_same_weights(weights(runs["zeroed"] / "final"), weights(runs["kept"] / "final"), atol=1e-6)
    with pytest.raises(AssertionError):
        assert_same_weights(weights(runs["all"] / "final"), weights(runs["kept"] / "final"), atol=1e-6)


def test_sft_refuses_per_record_weights(tiny_model_dir: Path, eight_pairs: Path, tmp_path: Path) -> None:
    from preftune.errors import DataError
    from preftune.stages.sft import run as run_sft

    with pytest.raises(DataError, match="field 'weight' is 2.0; SFT's loss is a mean over tokens"):
        run_sft(load_config(SFTConfig, CONFIGS / "sft-tiny.yaml", [f"--model.path={tiny_model_dir}", f"--data.train={eight_pairs}", *EXACT,
                                                                   f"--train.output_dir={tmp_path / 'sft'}"]))


def test_sum_counts_adds_each_count_over_the_micro_batches() -> None:
    from preftune.training.task import count_examples, sum_counts

    batches = [{"weight": torch.ones(3)}, {"weight": torch.ones(5)}]
    assert float(sum_counts(batches, count_examples)["examples"]) == 8.0


@pytest.mark.parametrize("optimizer,atol", [("sgd", 1e-6), ("adamw", 1e-5)])
@pytest.mark.fp32_exact
def test_accumulating_8_micro_batches_of_1_equals_one_batch_of_8(
    tiny_model_dir: Path, tmp_path: Path, optimizer: str, atol: float
) -> None:
    from preftune.models.tiny import synthetic_preferences

    data = write_jsonl(tmp_path / "eight.jsonl", synthetic_preferences(8, seed=5))
    common = ["--train.max_steps=2", "--train.save_every=null", "--train.eval_every=null", "--train.max_grad_norm=null",
              "--reference.strategy=copy", "--train.lr=1e-3", f"--train.optimizer={optimizer}"]
    one = run_dpo(dpo_config(tiny_model_dir, data, None, tmp_path / "one", "--train.batch_size=8", "--train.grad_accum=1", *common))
    acc = run_dpo(dpo_config(tiny_model_dir, data, None, tmp_path / "acc", "--train.batch_size=1", "--train.grad_accum=8", *common))
    # With plain SGD the update is lr * gradient, so this checks the accumulated gradient itself.
    # Adam divides by sqrt(v): float rounding in tiny gradients moves a weight by up to ~0.1% of
    # one lr-sized step, so 1e-5 (1% of a step) is its bound.
    assert_same_weights(weights(one / "final"), weights(acc / "final"), atol=atol)
    loss_one = [m["loss"] for m in read_metrics(one)]
    loss_acc = [m["loss"] for m in read_metrics(acc)]
    assert loss_one == pytest.approx(loss_acc, abs=1e-6)


class Crash(Exception):
    pass


def test_resume_after_a_crash_ends_with_the_same_weights(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    train, _ = preference_files
    common = ["--train.max_steps=6", "--train.deterministic=true", "--train.save_every=3", "--train.eval_every=null", "--train.batch_size=4",
              "--train.grad_accum=2", "--data.eval=[]", "--train.log_every=1"]
    straight = run_dpo(dpo_config(tiny_model_dir, train, None, tmp_path / "straight", *common))

    calls = {"n": 0}

    def crash_at_step_5(policy: object, reference: object) -> torch.Tensor:
        # an extra loss term that adds nothing, and crashes the run partway through step 5
        calls["n"] += 1
        if calls["n"] == 2 * 4 + 1:
            raise Crash()
        return torch.zeros(())

    with pytest.raises(Crash):
        run_dpo(dpo_config(tiny_model_dir, train, None, tmp_path / "crashed", *common), extra_terms=[crash_at_step_5])
    assert (tmp_path / "crashed" / "checkpoints" / "step-3").is_dir()
    assert not (tmp_path / "crashed" / "final").exists()
    resumed = run_dpo(dpo_config(tiny_model_dir, train, None, tmp_path / "crashed", *common, "--train.resume_from=latest"))
    assert_same_weights(weights(straight / "final"), weights(resumed / "final"), atol=0.0)
    # the resumed metrics log continues where the checkpoint left it, with no duplicate steps
    assert [m["step"] for m in read_metrics(resumed)] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in read_metrics(resumed)] == [m["loss"] for m in read_metrics(straight)]


def test_non_finite_loss_stops_with_the_step(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    train, _ = preference_files
    calls = {"n": 0}

    def nan_on_third_call(policy: object, reference: object) -> torch.Tensor:
        calls["n"] += 1
        return torch.tensor(float("nan") if calls["n"] == 3 else 0.0)

    cfg = dpo_config(tiny_model_dir, train, None, tmp_path / "nan", "--train.save_every=2", "--train.max_steps=5", "--train.eval_every=null")
    with pytest.raises(TrainingError, match=rf"step 3: the loss is nan \(not finite\) on records \S*{re.escape(train.name)}:\d+, .*step-2"):
        run_dpo(cfg, extra_terms=[nan_on_third_call])


def test_likelihood_displacement_warns_once() -> None:
    from preftune.training.callbacks import DisplacementWatch

    watch = DisplacementWatch(patience=3)
    with pytest.warns(UserWarning, match="likelihood displacement"):
        for i in range(5):
            watch.update({"logps/chosen": -10.0 - i, "rewards/margins": 0.1 * i}, step=i)
    healthy = DisplacementWatch(patience=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(5):
            healthy.update({"logps/chosen": -10.0 + i, "rewards/margins": 0.1 * i}, step=i)


def test_bf16_autocast_run_then_fp32_run_in_one_process(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    # accelerate's process-wide state once refused a second run with another precision
    train, _ = preference_files
    common = ["--train.max_steps=2", "--train.save_every=null", "--train.eval_every=null"]
    low = run_dpo(dpo_config(tiny_model_dir, train, None, tmp_path / "bf16", "--train.bf16=true", *common))
    full = run_dpo(dpo_config(tiny_model_dir, train, None, tmp_path / "fp32", *common))
    first = [read_metrics(run)[0]["loss"] for run in (low, full)]
    assert first == pytest.approx([0.693147, 0.693147], abs=2e-2)
    assert all(torch.isfinite(torch.tensor(first)))


@pytest.mark.parametrize("lora", [False, True])
def test_checkpoints_load_with_from_pretrained(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path,
                                               lora: bool) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from preftune.models.weights import read_weights

    options = ["--model.lora.enabled=true", "--reference.strategy=adapter", "--model.lora.r=4"] if lora else []
    run = run_dpo(dpo_config(tiny_model_dir, preference_files[0], None, tmp_path / "run", "--train.max_steps=2",
                             "--train.save_every=1", "--train.eval_every=null", "--train.lr=1e-2", *options))
    checkpoint = run / "checkpoints" / "step-1"
    trained = {name.removeprefix("model."): value for name, value in read_weights(checkpoint).items()}
    # a full fine-tune's weights are stored once (in model.safetensors); LoRA's adapter, which peft names otherwise, in both
    assert (len(load_file(str(checkpoint / "weights.safetensors"))) == 0) is not lora
    assert (checkpoint / "weights_in_export.json").is_file() is not lora
    if not lora:
        weights_size = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
        assert weights_size < 1.01 * (checkpoint / "model.safetensors").stat().st_size
    if lora:
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(checkpoint))
        params = {name.replace(".default", ""): p for name, p in model.named_parameters() if "lora_" in name}
        assert {name.replace(".default", "") for name in trained} == set(params)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(checkpoint))
        params = dict(model.named_parameters())
    for name, value in trained.items():
        assert torch.equal(params[name.replace(".default", "")].detach(), value), name  # the weights of step 1, not the final ones
    if lora:  # lora_B starts at zero: trained adapters are not
        assert any(bool(p.abs().sum() > 0) for n, p in params.items() if "lora_B" in n)
    else:
        base = dict(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).named_parameters())
        assert not all(torch.equal(p, base[n]) for n, p in params.items())


def test_resume_after_a_kill_that_cut_the_last_metrics_line(tiny_model_dir: Path, preference_files: tuple[Path, Path],
                                                            tmp_path: Path) -> None:
    common = ["--train.save_every=2", "--train.eval_every=null", "--train.scheduler=constant", "--train.log_every=1"]
    straight = run_dpo(dpo_config(tiny_model_dir, preference_files[0], None, tmp_path / "straight", "--train.max_steps=4", *common))
    stopped = run_dpo(dpo_config(tiny_model_dir, preference_files[0], None, tmp_path / "stopped", "--train.max_steps=2", *common))
    metrics = stopped / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "lo', encoding="utf-8")  # what a kill mid-write leaves
    resumed = run_dpo(dpo_config(tiny_model_dir, preference_files[0], None, stopped, "--train.max_steps=4", *common,
                                 "--train.resume_from=latest"))
    assert [m["step"] for m in read_metrics(resumed)] == [m["step"] for m in read_metrics(straight)]
    assert_same_weights(weights(straight / "final"), weights(resumed / "final"), atol=0)


def test_a_non_finite_gradient_is_never_applied_and_the_last_checkpoint_is_good(tiny_model_dir: Path,
                                                                               preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    calls = {"n": 0}

    def nan_gradient_on_second_step(policy: object, reference: object) -> torch.Tensor:
        calls["n"] += 1
        zero = policy.chosen - policy.chosen.detach()  # value 0, gradient 1
        return zero.abs().sqrt().sum() if calls["n"] == 2 else zero.sum()  # sqrt at 0: a finite value, a NaN gradient

    cfg = dpo_config(tiny_model_dir, preference_files[0], None, tmp_path / "run", "--train.save_every=1", "--train.max_steps=4",
                     "--train.eval_every=null")
    with pytest.raises(TrainingError, match=r"step 2: the gradient norm is nan \(not finite\) on records \S+:\d+.*last good checkpoint is .*step-1"):
        run_dpo(cfg, extra_terms=[nan_gradient_on_second_step])
    from preftune.models.weights import read_weights

    saved = read_weights(tmp_path / "run" / "checkpoints" / "step-1")
    assert all(bool(torch.isfinite(v).all()) for v in saved.values())
    resumed = run_dpo(dpo_config(tiny_model_dir, preference_files[0], None, tmp_path / "run", "--train.save_every=1",
                                 "--train.max_steps=2", "--train.eval_every=null", "--train.resume_from=latest"))
    assert all(bool(torch.isfinite(v).all()) for v in weights(resumed / "final").values())


def test_the_stop_message_says_when_the_first_checkpoint_is_due(tiny_model_dir: Path, preference_files: tuple[Path, Path],
                                                                tmp_path: Path) -> None:
    def nan(policy: object, reference: object) -> torch.Tensor:
        return torch.tensor(float("nan"))

    cfg = dpo_config(tiny_model_dir, preference_files[0], None, tmp_path / "run", "--train.save_every=5", "--train.eval_every=null")
    with pytest.raises(TrainingError, match=r"no checkpoint was written yet \(the first is due at step 5\)"):
        run_dpo(cfg, extra_terms=[nan])


def test_the_resume_point_is_resolved_once_per_run(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's plan is made once where it starts (training/runplan.py); the precision and compile choices and the
    loop read its resume point instead of resolving train.resume_from again."""
    import sys

    import preftune.training.checkpoint as checkpoint

    common = ["--train.save_every=2", "--train.eval_every=null", "--train.log_every=1"]
    stopped = run_dpo(dpo_config(tiny_model_dir, preference_files[0], None, tmp_path / "run", "--train.max_steps=2", *common))
    calls: list[object] = []
    resolve = checkpoint.resolve_resume

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(args[0].resume_from)  # type: ignore[attr-defined]
        return resolve(*args, **kwargs)

    for module in [m for name, m in list(sys.modules.items()) if name.startswith("preftune") and hasattr(m, "resolve_resume")]:
        monkeypatch.setattr(module, "resolve_resume", counted)  # every module that holds it, under any import
    run_dpo(dpo_config(tiny_model_dir, preference_files[0], None, stopped, "--train.max_steps=3", *common, "--train.resume_from=latest"))
    assert calls == ["latest"]
    assert [m["step"] for m in read_metrics(stopped)] == [1, 2, 3]

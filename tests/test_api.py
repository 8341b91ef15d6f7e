"""api.py and the package root: one call per stage over models and data in memory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import preftune
from conftest import REPO, run_python
from preftune.errors import ConfigError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from preftune.models.tiny import synthetic_corpus, train_tokenizer

    tokenizer = train_tokenizer(synthetic_corpus(), vocab_size=300, out_dir=tmp_path_factory.mktemp("tok"))
    return tokenizer


def new_model(tokenizer, seed: int = 0):  # noqa: ANN001, ANN201
    from preftune.models.tiny import tiny_llama

    return tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=seed)


def pairs(n: int = 64, seed: int = 1) -> list[dict]:
    from preftune.models.tiny import synthetic_preferences

    return synthetic_preferences(n, seed=seed)


QUIET = {"progress": False, "report": False}


@pytest.mark.parametrize("page", ["README.md", "docs/api.md"])
def test_the_python_snippet_runs_as_written(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's 10-line Python start and the API page's longer one (a Dataset, a callback)."""
    text = (REPO / page).read_text(encoding="utf-8")
    block = re.search(r"<!-- python-api -->\s*```python\n(.*?)```", text, re.S)
    assert block, f"{page} has no python-api snippet"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block.group(1), page, "exec"), namespace)  # noqa: S102 - the snippet is the project's own
    result = namespace["result"]
    assert result.model is namespace["model"]  # trained in place, returned, not reloaded
    assert (result.run_dir / "final" / "config.json").is_file()
    assert result.metrics["eval/rewards/accuracies"] >= 0.5


def test_dpo_trains_the_model_passed_in_on_a_dataset(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    from datasets import Dataset

    model = new_model(tiny)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = preftune.dpo(model, train_data=Dataset.from_list(pairs()), eval_data=pairs(16, seed=2), tokenizer=tiny,
                          beta=0.1, lr=1e-3, max_steps=6, output_dir=str(tmp_path / "run"), **QUIET)
    assert result.model is model and result.tokenizer is tiny and result.step == 6
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items()), "the model did not change"
    assert {"loss", "rewards/margins", "eval/loss", "eval/rewards/accuracies"} <= set(result.metrics)
    report = json.loads((result.run_dir / "data_report.json").read_text())
    assert report["train"]["kept"] == 64 and report["eval"]["kept"] == 16
    assert report["train"]["files"] == ["train_data"]
    reference = json.loads((result.run_dir / "reference.json").read_text())
    assert reference["strategy"] == "copy" and reference["model"] == "given in memory"
    assert result.config.loss.beta == 0.1 and result.config.train.lr == 1e-3


def test_a_datasetdict_gives_train_and_held_out_splits(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    from datasets import Dataset, DatasetDict

    splits = DatasetDict({"train": Dataset.from_list(pairs(32)), "test": Dataset.from_list(pairs(8, seed=3))})
    result = preftune.dpo(new_model(tiny), train_data=splits, tokenizer=tiny, max_steps=2, output_dir=str(tmp_path / "r"), **QUIET)
    report = json.loads((result.run_dir / "data_report.json").read_text())
    assert report["train"]["kept"] == 32 and report["eval"]["kept"] == 8


class Recorder:
    def __init__(self, stop_at: int | None = None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.stop_at = stop_at

    def on_step_end(self, step: int, metrics: dict) -> bool:
        assert {"loss", "grad_norm", "lr"} <= set(metrics)
        self.calls.append(("step", step))
        return self.stop_at is not None and step >= self.stop_at

    def on_log(self, step: int, metrics: dict) -> None:
        self.calls.append(("log", step))

    def on_evaluate(self, step: int, metrics: dict) -> None:
        assert "eval/loss" in metrics
        self.calls.append(("eval", step))

    def on_save(self, step: int, metrics: dict) -> None:
        assert Path(metrics["path"]).is_dir()
        self.calls.append(("save", step))


def test_callbacks_see_every_event_and_can_stop_the_run(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    recorder = Recorder()
    preftune.sft(new_model(tiny), train_data=pairs(32), eval_data=pairs(8, seed=2), tokenizer=tiny, max_steps=4, log_every=2,
                 eval_every=2, save_every=3, output_dir=str(tmp_path / "all"), callbacks=[recorder], **QUIET)
    assert [c for c in recorder.calls if c[0] == "step"] == [("step", s) for s in (1, 2, 3, 4)]
    assert ("log", 2) in recorder.calls and ("log", 4) in recorder.calls
    assert ("eval", 2) in recorder.calls and ("eval", 4) in recorder.calls  # during training, and the final one
    assert ("save", 3) in recorder.calls

    stopper = Recorder(stop_at=2)
    result = preftune.sft(new_model(tiny), train_data=pairs(32), tokenizer=tiny, max_steps=50, output_dir=str(tmp_path / "stop"),
                          callbacks=[stopper], **QUIET)
    assert result.step == 2 and result.stopped_by == "Recorder.on_step_end"
    assert (result.run_dir / "final" / "config.json").is_file()  # a clean stop still saves the model
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 2  # the step it stopped at is logged


def test_reward_model_and_lora_policy_from_python(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    from peft import LoraConfig, get_peft_model

    rm = preftune.reward_model(new_model(tiny), train_data=pairs(32), tokenizer=tiny, max_steps=2, output_dir=str(tmp_path / "rm"), **QUIET)
    assert type(rm.model).__name__ == "RewardModel" and (rm.run_dir / "final" / "reward_head.safetensors").is_file()
    peft = get_peft_model(new_model(tiny), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    result = preftune.dpo(peft, train_data=pairs(32), tokenizer=tiny, max_steps=2, lr=1e-3, output_dir=str(tmp_path / "lora"), **QUIET)
    assert result.model is peft
    assert json.loads((result.run_dir / "reference.json").read_text())["strategy"] == "adapter"  # no second copy


def test_the_reference_cache_works_for_a_model_in_memory(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    settings = dict(tokenizer=tiny, max_steps=1, reference={"strategy": "cache", "cache_dir": str(tmp_path / "cache")}, **QUIET)
    first = preftune.dpo(new_model(tiny, seed=4), train_data=pairs(16), output_dir=str(tmp_path / "a"), **settings)
    again = preftune.dpo(new_model(tiny, seed=4), train_data=pairs(16), output_dir=str(tmp_path / "b"), **settings)
    other = preftune.dpo(new_model(tiny, seed=5), train_data=pairs(16), output_dir=str(tmp_path / "c"), **settings)
    warm = [json.loads((r.run_dir / "reference.json").read_text())["train_cache"]["warm"] for r in (first, again, other)]
    assert warm == [False, True, False]  # same weights: reused; other weights: a new key


def test_python_settings_are_checked_like_yaml(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    from preftune.config.schema import DPOConfig, LossConfig, load_config

    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("loss:\n  beta: -1\n")
    with pytest.raises(ConfigError) as from_yaml:
        load_config(DPOConfig, yaml_file)
    for bad in ({"beta": -1}, {"loss": {"beta": -1}}, {"config": DPOConfig(loss=LossConfig(beta=-1))}):
        with pytest.raises(ConfigError) as from_python:
            preftune.dpo(new_model(tiny), train_data=pairs(8), tokenizer=tiny, output_dir=str(tmp_path / "x"), **bad)
        assert str(from_python.value) == str(from_yaml.value).removeprefix(f"{yaml_file}: ")
    with pytest.raises(ConfigError, match="'learning_rate' is TRL's name; preftune's is 'train.lr'"):
        preftune.dpo(new_model(tiny), train_data=pairs(8), tokenizer=tiny, learning_rate=1e-6)
    with pytest.raises(ConfigError, match="several sections; say which"):
        preftune.dpo(new_model(tiny), train_data=pairs(8), tokenizer=tiny, path="x")
    with pytest.raises(ConfigError, match="Did you mean 'max_steps'"):
        preftune.dpo(new_model(tiny), train_data=pairs(8), tokenizer=tiny, max_step=3)
    with pytest.raises(ConfigError, match="name 'sigmoyd' is not a loss. Did you mean 'sigmoid'"):
        preftune.dpo(new_model(tiny), train_data=pairs(8), tokenizer=tiny, loss={"name": "sigmoyd"})
    with pytest.raises(preftune.PreftuneError, match="pass tokenizer="):
        preftune.dpo(new_model(tiny), train_data=pairs(8), output_dir=str(tmp_path / "y"))
    with pytest.raises(preftune.PreftuneError, match="DatasetDict|list of dicts"):
        preftune.dpo(new_model(tiny), train_data=42, tokenizer=tiny, output_dir=str(tmp_path / "z"))


@pytest.mark.full
def test_import_is_light_and_exports_only_the_public_names() -> None:
    code = "import sys, preftune; heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]; print(heavy)"
    out = run_python("-c", code, check=True).stdout.strip()
    assert out == "[]"
    assert set(preftune.__all__) == {"dpo", "sft", "reward_model", "kto", "Result", "DPOConfig", "SFTConfig", "RMConfig",
                                     "KTOConfig", "load_config", "PreftuneError", "__version__",
                                     "iterate", "IterationResult", "IterateConfig", "sweep"}
    assert callable(preftune.dpo) and preftune.DPOConfig.__name__ == "DPOConfig"
    with pytest.raises(AttributeError):
        preftune.run_dpo  # noqa: B018


def test_the_run_folder_says_how_the_run_ended(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    done = preftune.dpo(new_model(tiny), train_data=pairs(16), tokenizer=tiny, max_steps=1, output_dir=str(tmp_path / "ok"), **QUIET)
    status = json.loads((done.run_dir / "status.json").read_text())
    assert status == {"status": "finished", "step": 1, "stopped_by": None,
                      "precision": {"bf16": False, "setting": "auto", "why": status["precision"]["why"]},
                      "compile": {"on": False, "setting": "auto", "why": status["compile"]["why"]},
                      "processor": status["processor"], "started": status["started"], "seconds": status["seconds"]}
    assert status["processor"] and status["seconds"] >= 0 and status["started"] > 1.7e9
    with pytest.raises(preftune.PreftuneError, match="chosen"):
        preftune.dpo(new_model(tiny), train_data=[{"prompt": "a", "rejected": "b"}], tokenizer=tiny, output_dir=str(tmp_path / "bad"), **QUIET)
    assert not (tmp_path / "bad").exists()  # a run that fails before training leaves no folder behind


# --------------------------------------------------------------------------- TRL habits
def test_trl_habits_peft_config_processing_class_model_section_and_report_to_none(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    from peft import LoraConfig

    model_dir = tmp_path / "model"
    new_model(tiny).save_pretrained(str(model_dir))
    tiny.save_pretrained(str(model_dir))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    result = preftune.dpo(model={"path": str(model_dir), "dtype": "float32"}, train_data=pairs(16), processing_class=tiny,
                          peft_config=lora, max_steps=1, output_dir=str(tmp_path / "run"), train={"report_to": "none"}, **QUIET)
    assert result.config.model.lora.enabled and (result.config.model.lora.r, result.config.model.lora.alpha) == (4, 8)
    assert result.config.model.lora.target_modules == ["q_proj", "v_proj"] and result.config.train.report_to == []
    assert result.tokenizer is tiny and (result.run_dir / "final" / "adapter_config.json").is_file()
    with pytest.raises(ConfigError, match="peft_config sets use_dora"):
        preftune.dpo(new_model(tiny), pairs(8), tokenizer=tiny, peft_config=LoraConfig(r=4, use_dora=True), output_dir=str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="processing_class= is TRL's name for tokenizer="):
        preftune.dpo(new_model(tiny), pairs(8), tokenizer=tiny, processing_class=tiny, output_dir=str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_a_trl_dpo_config_is_converted(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    trl = pytest.importorskip("trl")

    args = trl.DPOConfig(output_dir=str(tmp_path / "trl-args"), learning_rate=5e-4, beta=0.3, max_steps=2, per_device_train_batch_size=4,
                         adam_beta2=0.98, loss_type=["ipo"], use_cpu=True, bf16=False, logging_steps=1, report_to="none",
                         hub_model_id="me/model")
    with pytest.warns(UserWarning, match="no preftune equivalent are ignored: .*hub_model_id"):
        result = preftune.dpo(new_model(tiny), pairs(16), tokenizer=tiny, config=args, **QUIET)
    cfg = result.config
    assert (cfg.train.lr, cfg.loss.beta, cfg.loss.name, cfg.train.max_steps, cfg.train.batch_size) == (5e-4, 0.3, "ipo", 2, 4)
    assert cfg.train.adam_betas == [0.9, 0.98] and cfg.train.output_dir == str(tmp_path / "trl-args") and result.step == 2
    lists = trl.DPOConfig(output_dir=str(tmp_path / "z"), use_cpu=True, bf16=False, ld_alpha=0.5, loss_type=["sigmoid", "sft"],
                          loss_weights=[1.0, 0.5])
    converted = preftune.dpo(new_model(tiny), pairs(8), tokenizer=tiny, config=lists, **QUIET).config.loss
    assert (converted.name, converted.weights, converted.ld_alpha) == (["dpo", "sft"], [1.0, 0.5], 0.5)
    for bad, match in ((dict(label_smoothing_factor=0.1), "label_smoothing_factor"), (dict(neftune_noise_alpha=5.0), "neftune_noise_alpha")):
        with pytest.raises(ConfigError, match=f"the TRL config sets {match}.*change what a run computes"):
            preftune.dpo(new_model(tiny), pairs(8), tokenizer=tiny, config=trl.DPOConfig(output_dir=str(tmp_path / "y"), use_cpu=True,
                                                                                         bf16=False, **bad))


@pytest.mark.parametrize("setting,answer", [
    ("eval_strategy", "train.eval_every"), ("save_strategy", "train.save_every"), ("train_dataset", "train_data="),
    ("peft_config", "model.lora"), ("processing_class", "tokenizer="), ("dataset_name", "data.train"), ("use_peft", "model.lora.enabled=true"),
])
def test_trl_names_get_the_right_hint(setting: str, answer: str) -> None:
    from preftune.config.schema import DPOConfig, load_config

    with pytest.raises(ConfigError, match=f"'{setting}' is TRL's.*{re.escape(answer)}"):
        load_config(DPOConfig, None, [f"--{setting}" if setting == "use_peft" else f"--{setting}=x"])
    with pytest.raises(ConfigError, match=f"'{setting}' is TRL's.*{re.escape(answer)}"):
        preftune.dpo("/not/used", [], **{setting: "x"}) if setting not in ("peft_config", "processing_class") else \
            load_config(DPOConfig, None, [f"--train.{setting}=x"])

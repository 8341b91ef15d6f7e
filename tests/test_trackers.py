"""trackers.py: train.report_to sends the config and every log line, under TRL's names, to
TensorBoard, Weights & Biases (offline) and MLflow (a local file store); read back here. The
TensorBoard tags are those of TRL's DPOTrainer on the same run."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

import preftune
from preftune.training.trackers import flat_config, trl_hparams, trl_metric_names


def test_trl_metric_names() -> None:
    record = {"step": 3, "loss": 0.5, "lr": 1e-6, "eval/rewards/accuracies": 0.75, "num_tokens": 10, "note": "x", "done": True}
    assert trl_metric_names(record) == {"loss": 0.5, "learning_rate": 1e-6, "eval_rewards/accuracies": 0.75, "num_tokens": 10}
    assert trl_metric_names(record, prefixed=True) == {"train/loss": 0.5, "train/learning_rate": 1e-6, "eval/rewards/accuracies": 0.75,
                                                       "train/num_tokens": 10}
    hparams = trl_hparams(flat_config({"train": {"lr": 1e-6, "adam_betas": [0.9, 0.99], "progress": False, "bf16": None},
                                       "loss": {"name": "dpo", "beta": 0.2}, "reference": {"strategy": "cache"}}))
    assert hparams == {"learning_rate": 1e-6, "adam_beta1": 0.9, "adam_beta2": 0.99, "disable_tqdm": True, "bf16": "null",
                       "loss_type": "sigmoid", "beta": 0.2, "precompute_ref_log_probs": True}
    assert flat_config({"train": {"lr": 1e-6, "adam_betas": [0.9, 0.99]}, "data": {"columns": {}, "system": None}}) == {
        "train.lr": 1e-6, "train.adam_betas": "[0.9, 0.99]", "data.columns": "{}", "data.system": "null"}


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (a LevelDB-style log of protobuf records: 7-byte file header,
    32 KiB blocks, each record a 7-byte header of crc32, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, parts, out = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            out.append(record)
    return out


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("wandb", reason="make test installs wandb (the dev extras)")
    pytest.importorskip("mlflow", reason="make test installs mlflow-skinny (the dev extras)")
    pytest.importorskip("tensorboard", reason="make test installs tensorboard (the dev extras)")
    from preftune.models.tiny import synthetic_corpus, synthetic_preferences, tiny_llama, train_tokenizer

    tmp = tmp_path_factory.mktemp("tracked")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_DIR", str(tmp))
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("MLFLOW_TRACKING_URI", (tmp / "mlruns").as_uri())
    mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this to write a file store
    try:
        tokenizer = train_tokenizer(synthetic_corpus(), vocab_size=300, out_dir=tmp / "tok")
        result = preftune.dpo(tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4), tokenizer=tokenizer,
                              train_data=synthetic_preferences(32, seed=1), eval_data=synthetic_preferences(8, seed=2),
                              max_steps=4, log_every=2, eval_every=2, beta=0.2, output_dir=str(tmp / "run"), progress=False,
                              report=False, report_to=["tensorboard", "wandb", "mlflow"], project="preftune-test", run_name="tracked")
    finally:
        mp.undo()
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"tmp": tmp, "result": result, "train": [m for m in lines if "loss" in m], "eval": [m for m in lines if "eval/loss" in m]}


def test_tensorboard_receives_every_log_line(tracked_run: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run["result"].run_dir / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [m["step"] for m in tracked_run["train"]]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([m["loss"] for m in tracked_run["train"]])
    assert [e.value for e in events.Scalars("train/learning_rate")] == pytest.approx([m["lr"] for m in tracked_run["train"]])
    assert [e.value for e in events.Scalars("eval/rewards/accuracies")] == pytest.approx(
        [m["eval/rewards/accuracies"] for m in tracked_run["eval"]])


def test_wandb_offline_receives_the_config_and_the_metrics(tracked_run: dict) -> None:
    runs = sorted(tracked_run["tmp"].glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    records = wandb_records(runs[0])
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    config = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "config" for item in r.config.update}
    assert config["loss.beta"] == 0.2 and config["train.max_steps"] == 4 and config["model.disable_dropout"] is True
    assert config["beta"] == 0.2 and config["max_steps"] == 4 and config["disable_dropout"] is True  # and under TRL's names
    by_step = {row["_step"]: row for row in history}
    for line in tracked_run["train"]:
        assert by_step[line["step"]]["train/loss"] == pytest.approx(line["loss"])
        assert by_step[line["step"]]["train/learning_rate"] == pytest.approx(line["lr"])
        assert by_step[line["step"]]["train/num_tokens"] == line["num_tokens"]
        assert by_step[line["step"]]["train/global_step"] == line["step"]
    for line in tracked_run["eval"]:
        assert by_step[line["step"]]["eval/loss"] == pytest.approx(line["eval/loss"])


def test_mlflow_file_store_receives_the_config_and_the_metrics(tracked_run: dict) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient((tracked_run["tmp"] / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("preftune-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked"
    assert run.data.params["loss.beta"] == "0.2" and run.data.params["train.output_dir"].endswith("run")
    assert run.data.params["beta"] == "0.2" and run.data.params["learning_rate"] == run.data.params["train.lr"]
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [m["step"] for m in tracked_run["train"]]
    assert [m.value for m in losses] == pytest.approx([m["loss"] for m in tracked_run["train"]])
    evals = client.get_metric_history(run.info.run_id, "eval_rewards/margins")
    assert [m.value for m in evals] == pytest.approx([m["eval/rewards/margins"] for m in tracked_run["eval"]])


def test_an_unknown_or_missing_tracker_is_a_clear_error(tmp_path: Path) -> None:
    from preftune.config.schema import DPOConfig, load_config
    from preftune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"report_to: unknown tracker\(s\) 'wandbb' \(known: tensorboard, wandb, mlflow\)"):
        load_config(DPOConfig, None, ["--train.report_to=[wandbb]"])


#: What TRL's DPOTrainer logs and preftune does not: full-vocabulary logits statistics (preftune
#: never materialises the logits), the trainer's timings and FLOPs, and end-of-run summaries.
TRL_ONLY = {"entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy", "runtime", "samples_per_second", "steps_per_second",
            "total_flos", "train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second",
            "eval/num_tokens"}  # TRL repeats the training token count in its eval lines
#: ... and what preftune logs that TRL does not
PREFTUNE_ONLY = {"tokens_per_second"}


@pytest.mark.full
@pytest.mark.slow
def test_tensorboard_tags_are_trls_on_the_same_run(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="make test installs tensorboard (the dev extras)")
    from datasets import Dataset
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    train, held = ([json.loads(line) for line in path.read_text().splitlines()][:n] for path, n in zip(preference_files, (16, 4)))
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=2,
                     logging_steps=1, eval_steps=2, eval_strategy="steps", save_strategy="no", report_to=["tensorboard"],
                     use_cpu=True, disable_tqdm=True)
    DPOTrainer(model=str(tiny_model_dir), args=args, train_dataset=Dataset.from_list(train), eval_dataset=Dataset.from_list(held),
               processing_class=AutoTokenizer.from_pretrained(str(tiny_model_dir))).train()
    preftune.dpo(str(tiny_model_dir), train, eval_data=held, batch_size=4, max_steps=2, log_every=1, eval_every=2,
                 output_dir=str(tmp_path / "ours"), progress=False, report=False, report_to=["tensorboard"])

    def tags(folder: Path) -> set[str]:
        folders = {path.parent for path in folder.rglob("events.out.tfevents.*")}  # hyperparameters write their own
        return {tag for events in folders for tag in EventAccumulator(str(events)).Reload().Tags()["scalars"]}

    theirs, ours = tags(tmp_path / "trl"), tags(tmp_path / "ours")
    assert {"train/loss", "train/rewards/chosen", "train/learning_rate", "eval/loss", "eval/rewards/margins"} <= ours
    shared_theirs = {tag for tag in theirs if tag.split("/", 1)[1] not in TRL_ONLY and tag not in TRL_ONLY}
    assert shared_theirs == {tag for tag in ours if tag.split("/", 1)[1] not in PREFTUNE_ONLY}

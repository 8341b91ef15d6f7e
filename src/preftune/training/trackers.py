"""Experiment trackers (``train.report_to``): TensorBoard, Weights & Biases, MLflow, through
accelerate's tracker classes, so nothing of each library's API is written here.

Every tracker gets the resolved config as hyperparameters at the start, under both names:
preftune's (flattened to ``section.key``) and TRL's (``learning_rate``, ``beta``, ``loss_type``...,
from :data:`preftune.config.trl_names.TRL_NAMES`, :func:`trl_hparams`). Each log line of
``metrics.jsonl`` goes to each tracker under the names TRL's run gives that tracker, so a
user's dashboards, and comparisons between TRL and preftune runs, work unchanged: TensorBoard
and W&B get transformers' ``train/X`` and ``eval/X`` (``train/loss``, ``train/learning_rate``,
``train/rewards/chosen``, ``eval/loss``; W&B also ``train/global_step``), MLflow the flat names
(``loss``, ``learning_rate``, ``eval_loss``) (:func:`trl_metric_names`).
Where each writes: TensorBoard ``RUN/tensorboard/``; W&B the project ``train.project``, run
``train.run_name`` (its own environment variables apply: ``WANDB_MODE=offline``,
``WANDB_DIR``); MLflow the experiment ``train.project`` at ``MLFLOW_TRACKING_URI`` (a file
store such as ``file:///path/mlruns`` works offline).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from preftune.config.schema import TRACKERS
from preftune.config.trl_names import TRL_LOSS_TYPES, TRL_NAMES
from preftune.errors import PreftuneError


def trl_metric_names(record: dict[str, Any], *, prefixed: bool = False) -> dict[str, Any]:
    """A log line with TRL's metric names, numbers only (what trackers take): as TRL's trainer
    logs them (``learning_rate``, ``eval_loss``: MLflow's names), or, ``prefixed``, as
    transformers' TensorBoard and W&B callbacks rewrite them (``train/learning_rate``, ``eval/loss``)."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if key == "lr":
            key = "learning_rate"
        if key.startswith("eval/"):
            key = key if prefixed else "eval_" + key[len("eval/"):]
        elif prefixed:
            key = "train/" + key
        out[key] = value
    return out


def trl_hparams(flat: dict[str, Any]) -> dict[str, Any]:
    """TRL's names for the flattened config's values (``learning_rate`` for ``train.lr``), where
    TRL has the setting and preftune an equivalent (:data:`TRL_NAMES`)."""
    losses = {ours: theirs for theirs, ours in TRL_LOSS_TYPES.items()}
    out: dict[str, Any] = {}
    for trl_name, target in TRL_NAMES.items():
        if not isinstance(target, str) or " / " in target:
            continue
        key, _, rest = target.partition(" ")
        if rest and rest != "(inverted)" and not rest.startswith("(default") and trl_name != "loss_type":
            continue  # a TRL choice such as eval_strategy that preftune says another way
        key, _, equals = key.partition("=")
        key, _, index = key.partition("[")
        if key not in flat:
            continue
        value = flat[key]
        if equals:
            value = value == equals
        elif index:
            value = json.loads(value)[int(index.rstrip("]"))]
        elif rest == "(inverted)":
            value = not value
        elif trl_name == "loss_type":
            value = losses.get(value, value)
        out[trl_name] = value
    return out


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-6}}`` -> ``{"train.lr": 1e-6}``; lists and None as JSON text (trackers take scalars)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            out.update(flat_config(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


class Trackers:
    """The run's trackers: started with the config, told every log line, finished at the end."""

    def __init__(self, names: list[str], run_dir: Path, *, project: str, run_name: str, config: dict[str, Any]) -> None:
        self.trackers = [_tracker(name, run_dir, project, run_name) for name in dict.fromkeys(names)]
        for tracker in self.trackers:
            tracker.start()
            flat = flat_config(config)
            tracker.store_init_configuration({**trl_hparams(flat), **flat})

    def log(self, record: dict[str, Any]) -> None:
        for tracker in self.trackers:
            values = trl_metric_names(record, prefixed=tracker.name != "mlflow")
            if tracker.name == "wandb":
                values["train/global_step"] = record["step"]
            tracker.log(values, step=record["step"])

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


def _tracker(name: str, run_dir: Path, project: str, run_name: str) -> Any:
    import importlib.util

    if name not in TRACKERS:
        raise PreftuneError(f"train.report_to: unknown tracker '{name}' (known: {', '.join(TRACKERS)})")
    if importlib.util.find_spec(TRACKERS[name]) is None:
        raise PreftuneError(f"train.report_to includes {name}, which needs the {TRACKERS[name]} package: pip install {TRACKERS[name]}")
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    if name == "tensorboard":
        return TensorBoardTracker("tensorboard", run_dir)
    if name == "wandb":
        return WandBTracker(project, name=run_name)
    return MLflowTracker(experiment_name=project, run_name=run_name)

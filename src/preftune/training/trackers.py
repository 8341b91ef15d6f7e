"""Experiment trackers (``train.report_to``): TensorBoard, Weights & Biases, MLflow, through
accelerate's tracker classes, so nothing of each library's API is written here.

Every tracker gets the resolved config as hyperparameters (flattened to ``section.key``) at the
start, and each log line of ``metrics.jsonl`` under TRL's names where the quantity is TRL's
(:func:`trl_metric_names`): ``learning_rate`` for ``lr``, ``eval_X`` for ``eval/X``; the rest
(``loss``, ``grad_norm``, ``epoch``, ``rewards/*``, ``logps/*``, ``num_tokens``) are the same.
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
from preftune.errors import PreftuneError


def trl_metric_names(record: dict[str, Any]) -> dict[str, Any]:
    """A log line with TRL's metric names, numbers only (what trackers take)."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if key == "lr":
            key = "learning_rate"
        elif key.startswith("eval/"):
            key = "eval_" + key[len("eval/"):]
        out[key] = value
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
            tracker.store_init_configuration(flat_config(config))

    def log(self, record: dict[str, Any]) -> None:
        values = trl_metric_names(record)
        for tracker in self.trackers:
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

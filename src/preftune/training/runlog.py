"""A run's log: metric windows (reduced over every process), ``metrics.jsonl`` lines, and the
experiment trackers they also go to."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from preftune.config.schema import TrainConfig
from preftune.errors import TrainingError
from preftune.system.distributed import all_gather, world


class MetricWindow:
    """Running means of metrics over a logging window (per example, or per micro-batch)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for name, value in metrics.items():
            value = value.detach().float()
            self.sums[name] = self.sums.get(name, 0.0) + float(value.sum())
            self.counts[name] = self.counts.get(name, 0) + value.numel()

    def means(self) -> dict[str, float]:
        """The means over the window, over every process (each holds its own examples' sums)."""
        sums, counts = self.sums, self.counts
        if world()[1] > 1:
            sums, counts = {}, {}
            for their_sums, their_counts in all_gather((self.sums, self.counts)):
                for name, value in their_sums.items():
                    sums[name] = sums.get(name, 0.0) + value
                    counts[name] = counts.get(name, 0) + their_counts[name]
        means = {name: sums[name] / counts[name] for name in sorted(sums) if counts[name]}
        if "rewards/margins" not in means and {"rewards/chosen", "rewards/rejected"} <= set(means):
            # rewards of unpaired rows (KTO's desirable and undesirable) have no per-example margin:
            # the difference of the two means, as TRL's KTOTrainer logs it
            means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
        return dict(sorted(means.items()))


def log_record(record: dict[str, Any], path: Path, trackers: Any, accelerator: Any) -> None:
    """Append ``record`` to ``metrics.jsonl`` and send it to the trackers (the main process only)."""
    if not accelerator.is_main_process:
        return
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    if trackers is not None:
        trackers.log(record)


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, forget logged lines past the checkpoint (they will be logged again), and a last
    line cut short by the kill that stopped the run; a damaged line before it is an error."""
    if not path.exists():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # written in part when the run was killed: logged again from the checkpoint
            raise TrainingError(f"{path}, line {number}: not a JSON line; the run folder is damaged (resume elsewhere).") from None
        if record.get("step", 0) <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def start_trackers(cfg: TrainConfig, run_dir: Path, hparams: dict[str, Any] | None) -> Any:
    """The trackers of ``train.report_to`` (and ``train.tensorboard``), or None when there are none."""
    from preftune.training.trackers import Trackers

    names = list(cfg.report_to) + (["tensorboard"] if cfg.tensorboard else [])
    if not names:
        return None
    return Trackers(names, run_dir, project=cfg.project, run_name=cfg.run_name or run_dir.name,
                    config=hparams if hparams is not None else {"train": dataclasses.asdict(cfg)})

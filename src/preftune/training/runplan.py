"""A run's plan: every decision about a run, made once where it starts and passed down.

Two moments make it, each once:

- when the run opens (:func:`plan_start`, a :class:`RunStart`): the checkpoint it resumes from
  (``train.resume_from`` resolved: ``latest`` found, the folder checked intact, written under the
  same config, global batch and data), decided on the main process and taken by every other; its
  processes and global batch (``batch_size x processes`` items per micro-batch: the unit the data
  position is counted in); the sha256 of each data file (kept in checkpoints: a resume on changed
  data is refused);
- right after the stage has built the model (:meth:`RunStart.decide`, a complete :class:`RunPlan`):
  its precision (``train.bf16``, :mod:`preftune.training.precision`) and compile choice
  (``train.compile``, :mod:`preftune.training.compile_choice`), which need the model and the
  optimizer steps a training set of N items takes (:func:`planned_steps`).

Nothing in a :class:`RunPlan` is optional and nothing is re-derived further down: the loop, the
stages and the reference read the plan.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preftune.system.distributed import decided_on_main, world
from preftune.training.checkpoint import resolve_resume
from preftune.training.compile_choice import CompileChoice, resolve_compile
from preftune.training.precision import PrecisionChoice, resolve_precision


def planned_steps(train: Any, items: int, processes: int = 1) -> int:
    """The optimizer steps a run of ``items`` training items takes: the one count the loop runs for
    and ``train.compile: auto`` plans with (``train.max_steps``, else its epochs)."""
    per_epoch = math.ceil(math.ceil(items / (train.batch_size * processes)) / train.grad_accum)
    return train.max_steps or train.epochs * per_epoch


@dataclasses.dataclass(frozen=True)
class RunStart:
    """What a run decided as it opened, before any model is built (see the module docstring)."""

    resume: Path | None  # the checked checkpoint the run continues from; None: a fresh run
    processes: int
    global_batch: int  # items per global micro-batch: train.batch_size x processes
    data_digests: dict[str, str]  # the sha256 of each local data file, by path

    def total_steps(self, train: Any, items: int) -> int:
        """The optimizer steps a run on ``items`` training items takes."""
        return planned_steps(train, items, self.processes)

    def decide(self, train: Any, model: nn.Module, items: int, device: torch.device | str) -> RunPlan:
        """The complete plan for training ``model`` on ``items`` items: precision and compile decided
        (on the main process; a resume takes the checkpoint's record)."""
        precision = resolve_precision(train, model, device, resume=self.resume)
        compile_choice = resolve_compile(train, model, self.total_steps(train, items), device, resume=self.resume)
        return RunPlan(**dataclasses.asdict(self), precision=precision, compile=compile_choice)


@dataclasses.dataclass(frozen=True)
class RunPlan(RunStart):
    """Every decision of a run (see the module docstring): nothing optional."""

    precision: PrecisionChoice
    compile: CompileChoice


def plan_start(train: Any, run_dir: Path, config: dict[str, Any], data: dict[str, str]) -> RunStart:
    """Start the plan of ``train`` in ``run_dir``: the resume point resolved and checked on the main process
    (against ``config``, the run's resolved config, and ``data``, the digests of its data files; a
    refusal is raised on every process), the global batch from the launcher's processes."""
    _, processes = world()
    global_batch = train.batch_size * processes
    resume = decided_on_main(lambda: resolve_resume(train, Path(run_dir), config, global_batch=global_batch, data=data))
    return RunStart(resume=resume, processes=processes, global_batch=global_batch, data_digests=data)

"""A run's plan: every decision about a run, made once where it starts and passed down.

- the checkpoint it resumes from (``train.resume_from`` resolved: ``latest`` found, the folder
  checked intact, written under the same config, global batch and data), decided on the main
  process and taken by every other;
- its processes and global batch (``batch_size x processes`` items per micro-batch: the unit the
  data position is counted in);
- the sha256 of each data file (kept in checkpoints: a resume on changed data is refused);
- its precision (``train.bf16``, :mod:`preftune.training.precision`) and compile choice
  (``train.compile``, :mod:`preftune.training.compile_choice`), which need the model and are
  added to the plan when the stage has built it (:meth:`RunPlan.with_choices`);
- the optimizer steps a training set of N items takes (:meth:`RunPlan.total_steps`), the count the
  compile choice plans with and the loop runs.

Nothing here is re-derived further down: the loop, the stages and the choices read the plan.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from preftune.system.distributed import decided_on_main, world
from preftune.training.checkpoint import resolve_resume
from preftune.training.compile_choice import CompileChoice, planned_steps
from preftune.training.precision import PrecisionChoice


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What a run decided when it started (see the module docstring)."""

    resume: Path | None  # the checked checkpoint the run continues from; None: a fresh run
    processes: int
    global_batch: int  # items per global micro-batch: train.batch_size x processes
    data_digests: dict[str, str] | None = None  # the sha256 of each local data file, by path (None: not known, not checked)
    precision: PrecisionChoice | None = None  # train.bf16 resolved (None: not yet; the loop's caller resolves it)
    compile: CompileChoice | None = None  # train.compile resolved (None: not yet; the loop resolves it)

    def total_steps(self, train: Any, items: int) -> int:
        """The optimizer steps a run on ``items`` training items takes (``train.max_steps``, else its epochs)."""
        return planned_steps(train, items, self.processes)

    def with_choices(self, *, precision: PrecisionChoice | None = None, compile: CompileChoice | None = None) -> RunPlan:
        """The plan with the choices made once the model is built (those not given kept)."""
        return dataclasses.replace(self, precision=precision or self.precision, compile=compile or self.compile)


def plan_run(train: Any, run_dir: Path, config: dict[str, Any] | None = None, data: dict[str, str] | None = None) -> RunPlan:
    """Plan the run of ``train`` in ``run_dir``: the resume point resolved and checked on the main process
    (against ``config``, the run's resolved config, and ``data``, the digests of its data files; a
    refusal is raised on every process), the global batch from the launcher's processes."""
    _, processes = world()
    global_batch = train.batch_size * processes
    resume = decided_on_main(lambda: resolve_resume(train, Path(run_dir), config, global_batch=global_batch, data=data))
    return RunPlan(resume=resume, processes=processes, global_batch=global_batch, data_digests=data)

"""What a stage gives the training loop (a :class:`Task`), and how the loop cuts its data into batches.

A task says what to optimise, how to score a batch and what the loss is a mean over
(:attr:`Task.counts`); the loop (:mod:`preftune.training.loop`) computes no objective itself.
The data position is counted in GLOBAL micro-batches (``batch_size`` per process), so one
process with that batch would see the same batches: :func:`epoch_batches` and :func:`shard`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from preftune.errors import PreftuneError
from preftune.training.runplan import RunStart

Batch = dict[str, Any]
#: (batch) -> the sums a loss is normalised by, e.g. {"weight": sum of example weights} or
#: {"tokens": scored tokens}; summed over an optimizer step's micro-batches into ``totals``.
CountFn = Callable[[Batch], dict[str, torch.Tensor]]
#: (model as prepared by accelerate, batch, totals) -> (this micro-batch's share of the step's
#: loss: its sums divided by ``totals``, metrics). Metrics are per-example tensors (B,) or
#: scalars; the loop averages them.
LossFn = Callable[[nn.Module, Batch, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def count_examples(batch: Batch) -> dict[str, torch.Tensor]:
    """The default :data:`CountFn`: examples (rows of ``weight``)."""
    return {"examples": torch.tensor(float(batch["weight"].shape[0]))}


@dataclass
class Task:
    """What a stage gives the loop."""

    model: nn.Module  # the module run on batches; its trainable parameters are optimised
    loss_fn: LossFn
    train_set: Sequence[Any]
    collate: Callable[[list[Any]], Batch]
    lengths: list[int]  # tokens per train item, for length grouping
    counts: CountFn = count_examples  # what loss_fn's means are over (exact accumulation: training/loop.py's docstring)
    eval_set: Sequence[Any] | None = None
    save_final: Callable[..., None] | None = None  # write the final model to a folder (state_dict=: a sharded run's, gathered)
    save_model: Callable[..., None] | None = None  # the same into each checkpoint (default: save_final)
    group_by_length: bool = True
    output: nn.Module | None = None  # what the stage produces (the policy, the reward model): the Python API returns it
    after_step: Callable[[int], None] | None = None  # called on every process after each optimizer step (TR-DPO's reference sync)


def sum_counts(batches: Sequence[Batch], counts: CountFn) -> dict[str, torch.Tensor]:
    """Each count summed over ``batches`` (an optimizer step's micro-batches)."""
    totals: dict[str, torch.Tensor] = {}
    for batch in batches:
        for name, value in counts(batch).items():
            value = torch.as_tensor(value, dtype=torch.float32)
            totals[name] = totals[name] + value if name in totals else value
    return totals


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def epoch_batches(task: Task, global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's GLOBAL micro-batches (``batch_size`` per process, so ``global_batch`` = ``batch_size x processes``
    items each), length-grouped over the whole set exactly as one process with that batch would."""
    from preftune.data.collate import LengthGroupedBatchSampler

    sampler = LengthGroupedBatchSampler(task.lengths, global_batch, seed=seed, shuffle=True, group_by_length=task.group_by_length)
    sampler.set_epoch(epoch)
    return list(sampler)


def shard(indices: list[int], rank: int, processes: int) -> list[int]:
    """This process's contiguous part of a global micro-batch (parts differ in size by one at most)."""
    base, extra = divmod(len(indices), processes)
    start = rank * base + min(rank, extra)
    return indices[start : start + base + (1 if rank < extra else 0)]


def check_shards(n_items: int, plan: RunStart) -> None:
    """Every process needs an example in every micro-batch (DDP runs the step on all of them)."""
    processes = plan.processes
    if processes == 1:
        return
    tail = n_items % plan.global_batch
    if n_items < processes or 0 < tail < processes:
        raise PreftuneError(
            f"{n_items} training items in global batches of {plan.global_batch // processes} x {processes} processes leave a last batch of "
            f"{tail or n_items} for {processes} processes; choose train.batch_size so that each process gets at least one "
            "example of every batch (or run on fewer processes)."
        )

"""The held-out evaluation the training loop runs every ``train.eval_every`` steps and at the end."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from preftune.config.schema import TrainConfig
from preftune.system.distributed import all_gather, all_sum, world
from preftune.system.progress import batches
from preftune.training.runlog import MetricWindow
from preftune.training.sharding import is_sharded
from preftune.training.task import Task, sum_counts, to_device


def evaluate_held_out(task: Task, model: nn.Module, cfg: TrainConfig, accelerator: Any) -> dict[str, float]:
    """Mean metrics over the held-out set, in a fixed order, without gradients.

    ``eval/loss`` is the loss of the whole held-out set as one batch (each batch's share of the
    set's totals, summed), so it does not depend on how the set is batched or split; the other
    metrics are per-example means. With several processes each scores every n-th item and the
    means are taken over all of them; the model runs unwrapped (no DDP collectives in a loop
    whose length differs between processes). A sharded model gathers each layer from every
    process in each forward, so there every process runs as many batches as the busiest one
    (the extra ones on a repeated item, their results unused).
    """
    if not task.eval_set:
        return {}
    rank, processes = world()
    items = list(task.eval_set)[rank::processes]
    size = cfg.eval_batch_size or cfg.batch_size
    window = MetricWindow()
    was_training = model.training
    model.eval()
    net = accelerator.unwrap_model(model)
    starts = range(0, len(items), size)
    # The set's totals first (collating is cheap next to the forward passes), then each batch's share.
    local = sum_counts([task.collate(items[start : start + size]) for start in starts], task.counts) if items else {}
    names = sorted(set().union(*all_gather(sorted(local))))
    totals = {name: all_sum(local.get(name, torch.tensor(0.0))) for name in names}
    loss_sum = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for start in batches(len(items), size, desc="eval", enabled=cfg.progress and rank == 0):
            batch = to_device(task.collate(items[start : start + size]), accelerator.device)
            with accelerator.autocast():
                loss, metrics = task.loss_fn(net, batch, totals)
            loss_sum += float(loss.detach())
            window.add(metrics)
        for _ in range(max(all_gather(len(starts))) - len(starts) if is_sharded(net) else 0):
            task.loss_fn(net, to_device(task.collate(list(task.eval_set)[:1]), accelerator.device), totals)
    model.train(was_training)
    return {"eval/loss": float(all_sum(loss_sum)), **{f"eval/{k}": v for k, v in window.means().items()}}

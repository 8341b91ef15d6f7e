"""The optimizer and the learning-rate schedule the loop builds from ``train`` settings."""

from __future__ import annotations

import math

import torch
from torch import nn

from preftune.config.schema import TrainConfig


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
            fused=_can_fuse(params) or None,
        )
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _can_fuse(params: list[nn.Parameter]) -> bool:
    """The fused AdamW kernel (one kernel per step, not ~10 per tensor): torch >= 2.4 on CPU, CUDA.

    It is what TRL uses by default (``adamw_torch_fused``). On a busy or small machine the
    per-tensor kernel launches of the plain AdamW cost more than the arithmetic.
    """
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if version < (2, 4) or not params:
        return False
    devices = {p.device.type for p in params}
    return devices <= {"cpu", "cuda"} and len({p.device for p in params}) == 1 and all(p.is_floating_point() for p in params)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then constant, linear decay to 0, or cosine decay to 0."""
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

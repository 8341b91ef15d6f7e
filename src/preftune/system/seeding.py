"""Seeding every random number generator a run uses, once, when it starts."""

from __future__ import annotations

import random

import torch


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed Python and torch (all devices); ``deterministic`` also forbids nondeterministic kernels.

    On CUDA, atomic-add kernels (embedding and index_add backward) make two identical runs
    differ in the last bits; bitwise-exact resume there needs ``deterministic``.
    """
    import os

    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    else:
        torch.use_deterministic_algorithms(False)

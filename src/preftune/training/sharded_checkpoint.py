"""Checkpoints of a sharded run (``train.sharding=fsdp``), through ``torch.distributed.checkpoint``.

The folder is a normal checkpoint (:mod:`preftune.training.checkpoint`) except that the weights
and the optimizer state are not ``weights.safetensors`` / ``optimizer.pt`` but ``sharded/``: DCP's
files, each process writing its own part (``__N_0.distcp``) and the first process DCP's
``.metadata``. The scheduler, every process's RNG, the loop state, the run's config and the
exported model (gathered into one state dict and written with ``save_pretrained``, so a
checkpoint still loads with ``from_pretrained``) are written by the main process, then
``manifest.json`` last, after every process has finished its part: it covers every file.

Resuming reads ``sharded/`` into the model's and optimizer's state dicts as
``torch.distributed.checkpoint.state_dict`` gives them (keyed by parameter name, whatever the
sharding), so a run resumes on the same number of processes bitwise, and on another number
(DCP reshards; one process unsharded included) with the same global batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preftune.errors import TrainingError
from preftune.system.distributed import all_gather, barrier, is_main
from preftune.system.files import replace_folder, temporary_folder
from preftune.training.checkpoint import CONFIG_FILE, STATE_FILE, LoopState, write_manifest
from preftune.training.sharding import full_state_dict, part_of

SHARDED_DIR = "sharded"


def _states(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def save_sharded_checkpoint(folder: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                            scheduler: torch.optim.lr_scheduler.LRScheduler, state: LoopState,
                            export: Callable[..., None] | None, rng: list[dict[str, object]], config: dict[str, Any] | None,
                            output: nn.Module | None = None) -> Path:
    """Write ``folder`` atomically; every process calls this (module docstring)."""
    import torch.distributed.checkpoint as dcp

    local = [name for name, p in model.named_parameters()
             if not bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())]
    bad = sorted({name for names in all_gather(local) for name in names})
    if bad:
        raise TrainingError(f"no checkpoint written at step {state.step}: the weights are not all finite ({', '.join(bad[:3])}).")
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if is_main():
        temporary_folder(folder)
    barrier()
    dcp.save(_states(model, optimizer), checkpoint_id=str(tmp / SHARDED_DIR))
    weights = part_of(full_state_dict(model), model, output or model) if export is not None else None
    if is_main():
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"ranks": rng}, tmp / "rng.pt")
        if export is not None:
            export(tmp, state_dict=weights)
        if config is not None:
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1, default=str))
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
        write_manifest(tmp)  # last, once every process has written its part: it covers every file
        replace_folder(tmp, folder)
    barrier()
    return folder


def load_sharded_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Weights and optimizer state from ``folder/sharded`` into ``model`` and ``optimizer``,
    sharded or not (DCP reads each process's part of every tensor)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    states = _states(model, optimizer)
    try:
        dcp.load(states, checkpoint_id=str(Path(folder) / SHARDED_DIR))
    except Exception as err:  # noqa: BLE001 - DCP's CheckpointException wraps each process's error
        raise TrainingError(f"checkpoint '{folder}' does not match this model and optimizer (was it written with another "
                            f"model or LoRA setting?): {type(err).__name__}: {str(err)[:300]}") from None
    set_state_dict(model, optimizer, model_state_dict=states["model"], optim_state_dict=states["optimizer"])

"""Atomic checkpoints and exact resume.

A checkpoint is a folder ``checkpoints/step-N/`` holding the trainable weights
(``weights.safetensors``), the optimizer and scheduler states, the RNG states (Python's, torch's
CPU generator and every CUDA device's) and the loop's position in the data (``state.json``).
Every file is read back as plain data (``torch.load(weights_only=True)``): a checkpoint cannot
run code when it is resumed. It is written under a temporary name and renamed into
place, so a run killed mid-save never leaves a half-written ``step-N``.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from preftune.errors import TrainingError

STATE_FILE = "state.json"
WEIGHTS_FILE = "weights.safetensors"


@dataclass
class LoopState:
    """Where the loop is: enough to continue exactly where it stopped."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    batches_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    examples_seen: int = 0
    tokens_seen: int = 0
    global_batch: int = 0  # items per global micro-batch (batch_size x processes); 0: not recorded


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters the optimizer changes, by name (all of them, or just LoRA adapters)."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, object]:
    """Python's RNG, torch's CPU generator and each visible CUDA device's generator."""
    cuda = [state.clone() for state in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {"python": random.getstate(), "torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(rng: dict[str, object]) -> None:
    """Restore what :func:`rng_state` saved; CUDA states only where the run has CUDA devices."""
    random.setstate(rng["python"])  # type: ignore[arg-type]
    torch.set_rng_state(rng["torch"])  # type: ignore[arg-type]
    cuda = rng.get("cuda") or []
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():  # type: ignore[arg-type]
            raise TrainingError(f"the checkpoint holds RNG states for {len(cuda)} CUDA device(s), this process sees "  # type: ignore[arg-type]
                                f"{torch.cuda.device_count()}: resume with the same devices for an exact continuation.")
        torch.cuda.set_rng_state_all(cuda)  # type: ignore[arg-type]


def save_checkpoint(
    folder: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: LoopState,
    export: Callable[[Path], None] | None = None,
    rng: list[dict[str, object]] | None = None,
) -> Path:
    """Write a checkpoint atomically to ``folder`` (replacing nothing until complete).

    ``export`` writes the model as the stage saves its final one (``save_pretrained``), so a
    checkpoint also loads with ``from_pretrained`` (``PeftModel.from_pretrained`` for LoRA) and
    any tool can evaluate it; ``weights.safetensors`` stays the loop's own record for resuming.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / WEIGHTS_FILE))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    # one RNG state per process, in rank order (gathered by the caller when there are several)
    torch.save({"ranks": rng if rng is not None else [rng_state()]}, tmp / "rng.pt")
    if export is not None:
        export(tmp)
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))  # last: its presence marks a complete checkpoint
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step in ``run_dir/checkpoints``, if any."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    found = []
    for path in root.iterdir():
        name = path.name
        if name.startswith("step-") and name[5:].isdigit() and (path / STATE_FILE).is_file():
            found.append((int(name[5:]), path))
    return max(found)[1] if found else None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    root = Path(run_dir) / "checkpoints"
    steps = sorted(
        (int(p.name[5:]), p) for p in root.iterdir()
        if p.name.startswith("step-") and p.name[5:].isdigit() and (p / STATE_FILE).is_file()
    )
    for _, path in steps[:-keep]:
        shutil.rmtree(path)


def load_checkpoint(
    folder: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int = 0,
    global_batch: int = 0,
) -> LoopState:
    """Restore weights, optimizer, scheduler and this process's RNG from ``folder``; return the loop state.

    The data position is counted in global micro-batches, so a run resumes on another number of
    processes only when the global batch (``batch_size x processes``) is the same; otherwise the
    position would point at other examples, and the resume is refused.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise TrainingError(f"'{folder}' is not a preftune checkpoint (no {STATE_FILE}).")
    # Everything is read before anything is restored: a bad file leaves the model untouched.
    try:
        weights = load_file(str(folder / WEIGHTS_FILE))
        optimizer_state = torch.load(folder / "optimizer.pt", weights_only=True)
        scheduler_state = torch.load(folder / "scheduler.pt", weights_only=True)
        rng = torch.load(folder / "rng.pt", weights_only=True)
        state = LoopState(**json.loads((folder / STATE_FILE).read_text()))
    except (OSError, RuntimeError, ValueError, TypeError, pickle.UnpicklingError) as err:
        raise TrainingError(f"checkpoint '{folder}' cannot be read as plain data (a damaged file, or one that would run "
                            f"code when unpickled, which preftune refuses): {type(err).__name__}: {err}") from None
    if global_batch and state.global_batch and state.global_batch != global_batch:
        raise TrainingError(f"checkpoint '{folder}' was written with a global batch of {state.global_batch} "
                            f"(batch_size x processes); this run has {global_batch}. Resume with the same global batch.")
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        missing = sorted(expected - set(weights))[:3]
        extra = sorted(set(weights) - expected)[:3]
        raise TrainingError(
            f"checkpoint '{folder}' does not match this model's trainable parameters "
            f"(missing {missing}, unexpected {extra}): was it written with another model or LoRA setting?"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    ranks = rng.get("ranks", [rng])  # an older checkpoint holds one state
    set_rng_state(ranks[rank % len(ranks)])
    return state

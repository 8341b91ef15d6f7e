"""Atomic checkpoints and exact resume.

A checkpoint is a folder ``checkpoints/step-N/`` holding the trainable weights
(``weights.safetensors``, less those the exported model files hold already:
:mod:`preftune.models.weights`), the optimizer and scheduler states, the RNG states (Python's, torch's
CPU generator and every CUDA device's) and the loop's position in the data (``state.json``).
Every file is read back as plain data (``torch.load(weights_only=True)``): a checkpoint cannot
run code when it is resumed. It is written under a temporary name and renamed into
place, so a run killed mid-save never leaves a half-written ``step-N``; the last file written is
``manifest.json`` (every other file's size and sha256), and a folder whose manifest is missing
or does not match its files is never resumed from. A checkpoint also keeps the run's resolved
config (``run_config.json``): a resume under another config is refused, except for the settings in
:data:`RESUME_MAY_CHANGE`; and the sha256 of each data file (``data_digests.json``): a resume on a
file changed since is refused, naming it. A resume reads every file as plain data before the run
writes anything.
"""

from __future__ import annotations

import errno
import json
import pickle
import random
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preftune.errors import TrainingError
from preftune.models.weights import IN_EXPORT_FILE, WEIGHTS_FILE, read_weights, write_weights
from preftune.system.files import replace_folder, temporary_folder
from preftune.training.manifest import MANIFEST_FILE, STATE_FILE, manifest_problem, write_manifest

CONFIG_FILE = "run_config.json"  # not config.json: that is the exported model's
DATA_FILE = "data_digests.json"  # the sha256 of each data file the run read, by path
#: The settings a resume may change (dotted, as in overrides); any other difference from the
#: checkpoint's config is refused. They say how long to train, where and how often to log,
#: evaluate and save, and what to show; none changes what one optimizer step computes. The batch
#: per process may change with the number of processes: their product, the global batch, is
#: checked on its own (:func:`load_checkpoint`). ``train.compile`` and ``train.bf16`` change how a step
#: is rounded, not what it computes; a resume takes the recorded choice, and says when a setting
#: overrides it (:mod:`preftune.training.compile_choice`, :mod:`preftune.training.precision`).
RESUME_MAY_CHANGE = (
    "train.max_steps", "train.epochs", "train.batch_size", "train.output_dir", "train.resume_from", "train.overwrite",
    "train.log_every", "train.eval_every", "train.eval_batch_size", "train.save_every", "train.save_total_limit",
    "train.report_to", "train.project", "train.run_name", "train.tensorboard", "train.progress", "train.report",
    "train.compile", "train.bf16", "train.sharding",
)


@dataclass
class LoopState:
    """Where the loop is: enough to continue exactly where it stopped."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    batches_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    examples_seen: int = 0
    tokens_seen: int = 0
    global_batch: int = 0  # items per global micro-batch (batch_size x processes); 0: not recorded
    compiled: bool = False  # the steps ran compiled (train.compile, as resolved); not recorded (older checkpoints): eager
    bf16: bool | None = None  # the steps ran in bf16 autocast (train.bf16, as resolved); None: not recorded (older checkpoints)


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
    config: dict[str, Any] | None = None,
    data: dict[str, str] | None = None,
) -> Path:
    """Write a checkpoint atomically to ``folder`` (replacing nothing until complete).

    ``export`` writes the model as the stage saves its final one (``save_pretrained``), so a
    checkpoint also loads with ``from_pretrained`` (``PeftModel.from_pretrained`` for LoRA) and
    any tool can evaluate it; ``weights.safetensors`` stays the loop's own record for resuming,
    less what the export holds already (a full fine-tune's weights are stored once:
    :mod:`preftune.models.weights`). ``config`` (the run's resolved config) and ``data`` (each data
    file's sha256) are kept so a resume can check it continues the same run on the same data.
    Weights that are not all finite are refused: a checkpoint is only ever written from a finite state.
    """
    folder = Path(folder)
    weights = trainable_state(model)
    bad = non_finite(weights)
    if bad:
        raise TrainingError(f"no checkpoint written at step {state.step}: the weights are not all finite "
                            f"({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}).")
    tmp = temporary_folder(folder)
    try:
        _write_files(tmp, weights, optimizer, scheduler, state, export, rng, config, data)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)  # no partial checkpoint left behind
        need = sum(t.numel() * t.element_size() for t in weights.values()) + _state_bytes(optimizer.state_dict())
        free = shutil.disk_usage(tmp.parent).free
        if getattr(err, "errno", None) not in (errno.ENOSPC, errno.EDQUOT) and free >= need:
            raise
        raise TrainingError(f"no space left on the device to write checkpoint '{folder}': it needs about {need / 2**20:.1f} MiB "
                            f"(weights and optimizer state), {free / 2**20:.1f} MiB are free; the partial files were removed.") from None
    replace_folder(tmp, folder)
    return folder


def _state_bytes(tree: Any) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_state_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_state_bytes(v) for v in tree)
    return 0


def _write_files(tmp: Path, weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, scheduler: Any, state: LoopState,
                 export: Callable[[Path], None] | None, rng: list[dict[str, object]] | None, config: dict[str, Any] | None,
                 data: dict[str, str] | None) -> None:
    if export is not None:
        export(tmp)
    write_weights(weights, tmp)  # after the export: what it holds already is not written twice
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    # one RNG state per process, in rank order (gathered by the caller when there are several)
    torch.save({"ranks": rng if rng is not None else [rng_state()]}, tmp / "rng.pt")
    if config is not None:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1, default=str))
    if data is not None:
        (tmp / DATA_FILE).write_text(json.dumps(data, indent=1))
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
    write_manifest(tmp)  # last: a valid manifest marks a complete checkpoint


def _numbered(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    return sorted((int(p.name[5:]), p) for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit())


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def latest_checkpoint(run_dir: Path, *, say: Callable[[str], None] | None = None) -> Path | None:
    """The intact checkpoint (:func:`manifest_problem` finds nothing) with the highest step in
    ``run_dir/checkpoints``, if any; each newer folder passed over is told to ``say`` (default: stderr)."""
    say = say or _stderr
    for _, path in reversed(_numbered(Path(run_dir) / "checkpoints")):
        problem = manifest_problem(path)
        if problem is None:
            return path
        say(f"preftune: skipping checkpoint '{path}': {problem}.")
    return None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` intact checkpoints."""
    steps = [(step, p) for step, p in _numbered(Path(run_dir) / "checkpoints") if (p / MANIFEST_FILE).is_file()]
    for _, path in steps[:-keep]:
        shutil.rmtree(path)


def non_finite(weights: dict[str, torch.Tensor]) -> list[str]:
    """The names of the tensors holding a NaN or an infinity."""
    return [name for name, value in weights.items() if value.is_floating_point() and not bool(torch.isfinite(value).all())]


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(folder: Path, config: dict[str, Any]) -> list[str]:
    """The settings (dotted) in which ``config`` differs from the one checkpoint ``folder`` was
    written under, leaving out :data:`RESUME_MAY_CHANGE`; empty when the checkpoint kept none."""
    try:
        saved = json.loads((Path(folder) / CONFIG_FILE).read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as err:
        raise TrainingError(f"checkpoint '{folder}': its {CONFIG_FILE} cannot be read ({err}).") from None
    before, now = _flat(saved), _flat(json.loads(json.dumps(config, default=str)))
    return [f"{key} ({before.get(key, '<unset>')!r} -> {now.get(key, '<unset>')!r})" for key in sorted(set(before) | set(now))
            if key not in RESUME_MAY_CHANGE and before.get(key, "<unset>") != now.get(key, "<unset>")]


def resolve_resume(train: Any, run_dir: Path, config: dict[str, Any] | None = None,
                   say: Callable[[str], None] | None = None, global_batch: int = 0, data: dict[str, str] | None = None) -> Path | None:
    """The checkpoint ``train.resume_from`` names (``latest``: the newest intact one, each newer one
    passed over told to ``say``), checked intact and written under ``config`` but for
    :data:`RESUME_MAY_CHANGE`; None when not resuming."""
    if train.resume_from is None:
        return None
    if train.resume_from == "latest":
        skipped: list[str] = []
        found = latest_checkpoint(run_dir, say=lambda line: (skipped.append(line), (say or _stderr)(line)))
        if found is None:
            why = f" ({' '.join(line.removeprefix('preftune: ') for line in skipped)})" if skipped else ""
            raise TrainingError(f"train.resume_from=latest, but '{run_dir}/checkpoints' holds no complete checkpoint{why}.")
        check_resume(found, config, global_batch, data, intact=True)  # latest_checkpoint found it intact
        return found
    found = Path(train.resume_from)
    check_resume(found, config, global_batch, data)
    return found


def check_resume(folder: Path, config: dict[str, Any] | None, global_batch: int = 0, data: dict[str, str] | None = None, *,
                 intact: bool = False) -> None:
    """Refuse ``folder`` unless it is an intact checkpoint (``intact``: already checked so), readable as
    plain data, written under ``config`` (but for :data:`RESUME_MAY_CHANGE`) and on the data files of
    ``data`` as they are now."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainingError(f"train.resume_from: '{folder}' is not a folder.")
    problem = None if intact else manifest_problem(folder)
    if problem is not None:
        raise TrainingError(f"checkpoint '{folder}' is not resumed from: {problem}.")
    differences = config_differences(folder, config) if config is not None else []
    if differences:
        raise TrainingError(f"checkpoint '{folder}' was written under another config; a resume may change only "
                            f"{', '.join(RESUME_MAY_CHANGE)}. Different: {'; '.join(differences)}. Use the run's own config "
                            "(its config.yaml), or start a new run in another train.output_dir.")
    state = read_plain(folder, mapped=True)[-1]
    _check_global_batch(folder, state.global_batch, global_batch)
    _check_data(folder, data)


def _check_data(folder: Path, data: dict[str, str] | None) -> None:
    try:
        saved = json.loads((folder / DATA_FILE).read_text())
    except FileNotFoundError:  # an older checkpoint, or data given in memory
        return
    except (OSError, ValueError) as err:
        raise TrainingError(f"checkpoint '{folder}': its {DATA_FILE} cannot be read ({err}).") from None
    changed = sorted(path for path, digest in saved.items() if data is not None and path in data and data[path] != digest)
    if changed:
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise TrainingError(f"'{changed[0]}'{more} has changed since checkpoint '{folder}' was written (sha256 "
                            f"{saved[changed[0]][:12]}... then, {data[changed[0]][:12]}... now): a resume continues on the same data. "  # type: ignore[index]
                            "Put the file back, or start a new run in another train.output_dir.")


def read_plain(folder: Path, *, mapped: bool = False) -> tuple[dict[str, Any], Any, Any, Any, LoopState]:
    """Every file of checkpoint ``folder`` read as plain data (weights, optimizer, scheduler, RNG, loop
    state), or a TrainingError naming it: a damaged file, or a pickle that would run code, is refused.
    ``mapped``: the check alone, cheap on a large checkpoint (the pickles unpickled with their tensors
    memory-mapped, the weights' header read; the bytes themselves are the manifest's checksums' job)."""
    from safetensors import safe_open

    try:
        if (folder / "sharded").is_dir():  # a sharded run's weights and optimizer state: sharded_checkpoint reads them
            weights, optimizer_state = {}, {}
        elif mapped:
            with safe_open(str(folder / WEIGHTS_FILE), "pt") as opened:
                weights: dict[str, Any] = dict.fromkeys(opened.keys())
            if (folder / IN_EXPORT_FILE).is_file():
                weights.update(dict.fromkeys(json.loads((folder / IN_EXPORT_FILE).read_text(encoding="utf-8"))))
        else:
            weights = read_weights(folder)
        if not (folder / "sharded").is_dir():
            optimizer_state = torch.load(folder / "optimizer.pt", weights_only=True, mmap=mapped)
        scheduler_state = torch.load(folder / "scheduler.pt", weights_only=True, mmap=mapped)
        rng = torch.load(folder / "rng.pt", weights_only=True, mmap=mapped)
        state = LoopState(**json.loads((folder / STATE_FILE).read_text()))
    except (OSError, RuntimeError, ValueError, TypeError, pickle.UnpicklingError) as err:
        raise TrainingError(f"checkpoint '{folder}' cannot be read as plain data (a damaged file, or one that would run "
                            f"code when unpickled, which preftune refuses): {type(err).__name__}: {err}") from None
    return weights, optimizer_state, scheduler_state, rng, state


def _check_global_batch(folder: Path, saved: int, now: int) -> None:
    if now and saved and saved != now:
        raise TrainingError(f"checkpoint '{folder}' was written with a global batch of {saved} "
                            f"(batch_size x processes); this run has {now}. Resume with the same global batch.")


def load_checkpoint(
    folder: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int = 0,
    global_batch: int = 0,
    restore_sharded: Callable[[Path, nn.Module, torch.optim.Optimizer], None] | None = None,
    verified: bool = False,
) -> LoopState:
    """Restore weights, optimizer, scheduler and this process's RNG from ``folder``; return the loop state.

    The data position is counted in global micro-batches, so a run resumes on another number of
    processes only when the global batch (``batch_size x processes``) is the same; otherwise the
    position would point at other examples, and the resume is refused. A sharded run's
    checkpoint keeps weights and optimizer state in ``sharded/``, read by ``restore_sharded``
    (:mod:`preftune.training.sharded_checkpoint`). ``verified``: ``folder`` is a run plan's resume
    point, checked intact (and against the config and data) when the run opened: not checked again.
    """
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise TrainingError(f"'{folder}' is not a preftune checkpoint (no {STATE_FILE}).")
    problem = None if verified else manifest_problem(folder)
    if problem is not None:
        raise TrainingError(f"checkpoint '{folder}' is not resumed from: {problem}.")
    # Everything is read before anything is restored: a bad file leaves the model untouched.
    sharded = (folder / "sharded").is_dir()
    weights, optimizer_state, scheduler_state, rng, state = read_plain(folder)
    _check_global_batch(folder, state.global_batch, global_batch)
    if sharded and restore_sharded is not None:
        restore_sharded(folder, model, optimizer)
    elif sharded:
        raise TrainingError(f"checkpoint '{folder}' is a sharded run's; it is resumed by the training loop.")
    expected = set() if sharded else {name for name, p in model.named_parameters() if p.requires_grad}
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
    if not sharded:
        optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    ranks = rng.get("ranks", [rng])  # an older checkpoint holds one state
    set_rng_state(ranks[rank % len(ranks)])
    return state

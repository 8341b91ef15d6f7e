"""A run folder claimed for one run: preftune deletes or replaces only what a preftune run wrote.

A run folder holds the entries of :data:`RUN_FILES` and a marker, ``.preftune-run``, written when
a run first claims the folder: it says that those entries are preftune's. An entry of that list in a
folder without the marker (your own ``config.yaml``, a ``plots/`` or ``tensorboard/`` of another
tool) is never removed nor overwritten: the run is refused, naming it. A folder written before the
marker existed counts as preftune's when its ``status.json`` is one a run wrote.

Every check comes before the first change. Replacing an earlier run (``train.overwrite``, or one
that never trained) moves its entries aside into ``.preftune-replaced/``; they are deleted when
the new run begins training, and moved back when it fails before that, so a run that stops on bad
data or a wrong model leaves the folder byte for byte as it found it, subfolders included
(:meth:`Claim.undo`). A symbolic link among them is refused before anything moves: no run writes one.

One run per folder: a run holds an exclusive lock on ``.preftune-lock`` (``flock``: checked and
taken in one step, released when the run's claim is, or when the process ends, however it ends),
and a ``status.json`` that says ``running`` counts only while its process (pid and start time) is
alive. The lock file names its holder (host and pid), so a process that still holds a folder's lock
(a claim it never released) may claim the folder again; the :class:`Claim` keeps the lock, so no
table of locks is kept in the process.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError

STATUS_FILE = "status.json"
MARKER = ".preftune-run"
STASH = ".preftune-replaced"
LOCK = ".preftune-lock"
#: What a run writes into its folder (replaced by train.overwrite, and only that)
RUN_FILES = ("config.yaml", STATUS_FILE, "data_report.json", "reference.json", "metrics.jsonl", "report.html", "final",
             "checkpoints", "plots", "tensorboard")
#: ... the files a run rewrites before it trains (a resume puts them back when it fails before training)
REWRITTEN = ("config.yaml", STATUS_FILE, "data_report.json", "reference.json")
#: ... and what is worth keeping: a run that trained
TRAINED_FILES = ("metrics.jsonl", "final", "checkpoints")


def read_status(run_dir: Path) -> dict[str, Any]:
    """``status.json`` as a dict ({} when missing or unreadable)."""
    try:
        status = json.loads((Path(run_dir) / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def alive(pid: Any) -> bool:
    """Whether another process with id ``pid`` runs on this machine."""
    if not isinstance(pid, int) or pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return isinstance(pid, int) and pid < 1 << 31
    return True


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (Linux: clock ticks since boot, from /proc), or None where unknown:
    with the pid it tells a run's process from another that reused its number after a crash."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError, ValueError):
        return None


def writing(status: dict[str, Any]) -> bool:
    """Whether the run ``status.json`` describes is still writing: running, on this host, its process
    alive and (where recorded) started when the run's did."""
    if status.get("status") != "running" or status.get("host") != socket.gethostname() or not alive(status.get("pid")):
        return False
    return status.get("pid_start") is None or process_start(status["pid"]) in (None, status["pid_start"])


def _holder() -> bytes:
    """What the lock file says of the process holding it: this host and process."""
    return f"{socket.gethostname()} {os.getpid()}".encode()


def lock(run_dir: Path) -> tuple[int | None, bool]:
    """Hold ``run_dir/.preftune-lock`` exclusively (one run per folder, checked and taken at once):
    (the open lock file, whether this call created it). A lock this process holds already (through
    a claim it did not release) is kept: (None, False)."""
    import fcntl

    path = run_dir / LOCK
    created = not path.exists()
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        if path.read_bytes() == _holder():
            return None, False
        raise PreftuneError(f"another preftune run is writing to '{run_dir}' (it holds {path}); wait for it, or choose "
                            "another train.output_dir.") from None
    os.ftruncate(fd, 0)
    os.write(fd, _holder())
    return fd, created


def is_ours(run_dir: Path) -> bool:
    """Whether ``run_dir``'s run entries were written by preftune (its marker, or a run's ``status.json``)."""
    if (run_dir / MARKER).is_file():
        return True
    return read_status(run_dir).get("status") in ("running", "finished", "failed")


def _entries(run_dir: Path) -> list[str]:
    return [name for name in RUN_FILES if os.path.lexists(run_dir / name)]


@dataclass
class Claim:
    """A folder as a run found it, and how to put it back (see the module docstring)."""

    dir: Path
    created: bool
    existed: set[str] = field(default_factory=set)  # run entries left in place (a resume)
    files: dict[str, bytes] = field(default_factory=dict)  # their bytes, for the files the run rewrites
    moved: list[str] = field(default_factory=list)  # entries moved aside into STASH
    marked: bool = False  # the marker was written by this claim
    locked: bool = False  # the lock file was created by this claim
    lock_fd: int | None = None  # the open lock file: the folder is this run's until :meth:`release`

    def release(self) -> None:
        """Let the folder's lock go (the file stays, emptied: removing it would race another run's lock)."""
        if self.lock_fd is not None:
            os.ftruncate(self.lock_fd, 0)  # no longer this process's: it may not take the lock as its own again
            os.close(self.lock_fd)
            self.lock_fd = None

    def undo(self) -> None:
        """Put the folder back as it was found: what this run wrote removed, what it moved aside back."""
        self.release()
        if self.created:
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        for name in RUN_FILES:
            path = self.dir / name
            if name in self.files:
                path.write_bytes(self.files[name])
            elif name not in self.existed and os.path.lexists(path):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        for name in self.moved:
            os.replace(self.dir / STASH / name, self.dir / name)
        shutil.rmtree(self.dir / STASH, ignore_errors=True)
        for name, made in ((MARKER, self.marked), (LOCK, self.locked)):
            if made:
                (self.dir / name).unlink(missing_ok=True)

    def commit(self) -> None:
        """Training begins: what was replaced is deleted for good."""
        shutil.rmtree(self.dir / STASH, ignore_errors=True)


def check_folder(run_dir: Path, train: Any, *, locked: bool = False) -> list[str]:
    """Every reason to refuse ``run_dir`` for a run with ``train``'s settings, raised before anything
    is written (``locked``: this process holds the folder's lock, so no other run writes there); returns the run entries it holds."""
    if os.path.lexists(run_dir) and not run_dir.is_dir():
        raise PreftuneError(f"train.output_dir '{run_dir}' is a file, not a folder.")
    status = read_status(run_dir)
    if writing(status) and not locked:
        raise PreftuneError(f"another preftune run (pid {status['pid']}) is writing to '{run_dir}'; wait for it, or choose "
                            "another train.output_dir.")
    held = _entries(run_dir)
    if held and not is_ours(run_dir):
        raise PreftuneError(f"'{run_dir / held[0]}' was not written by a preftune run (the folder has no {MARKER}); preftune "
                            "replaces only what it wrote: move it away, or choose another train.output_dir.")
    if held and not train.resume_from:
        trained = [name for name in held if name in TRAINED_FILES]  # a run that stopped before training leaves nothing to keep
        if trained and not train.overwrite:
            what = status.get("status", "unknown state")
            step = f" at step {status['step']}" if status.get("step") else ""
            raise PreftuneError(f"'{run_dir}' already holds a run ({what}{step}; {', '.join(trained)}); choose another "
                                "train.output_dir, continue it with train.resume_from=latest, or replace it with train.overwrite=true.")
        links = [run_dir / name for name in held if (run_dir / name).is_symlink()]
        if links:
            raise PreftuneError(f"'{links[0]}' is a symbolic link, which no preftune run writes: nothing was replaced; remove "
                                "the link, or choose another train.output_dir.")
    return held


def claim_folder(run_dir: Path, train: Any) -> Claim:
    """Make ``run_dir`` this run's: never two runs at once in one folder, never a finished run
    overwritten by accident (``train.resume_from`` continues it, ``train.overwrite`` replaces it),
    never an entry preftune did not write touched. Returns how to undo it."""
    run_dir = Path(run_dir)
    held = check_folder(run_dir, train)
    claim = Claim(run_dir, created=not run_dir.exists())
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        claim.lock_fd, claim.locked = lock(run_dir)
        held = check_folder(run_dir, train, locked=True)  # again, now that no other run can change the folder
    except PreftuneError:
        claim.release()
        if claim.created:
            shutil.rmtree(run_dir, ignore_errors=True)
        elif claim.locked:
            (run_dir / LOCK).unlink(missing_ok=True)
        raise
    if os.path.lexists(run_dir / STASH):  # left by a run killed before it trained: what it replaced stays replaced
        shutil.rmtree(run_dir / STASH)
    if train.resume_from:
        claim.existed = set(held)
        claim.files = {name: (run_dir / name).read_bytes() for name in REWRITTEN if (run_dir / name).is_file()}
    elif held:
        (run_dir / STASH).mkdir()
        for name in held:
            os.replace(run_dir / name, run_dir / STASH / name)
            claim.moved.append(name)
    if not (run_dir / MARKER).is_file():
        (run_dir / MARKER).write_text(json.dumps({"written_by": "preftune", "entries": list(RUN_FILES)}) + "\n", encoding="utf-8")
        claim.marked = True
    return claim

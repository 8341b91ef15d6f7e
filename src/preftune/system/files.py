"""Files written whole or not at all, and what a file's bytes hash to: the one place for both.

A file is written under a temporary name beside it (``NAME.tmpPID``: the writer's process id, so
:func:`preftune.data.cache.remove_stale` can tell a dead writer's leftovers from a live one's) and
renamed into place, so a run killed mid-write leaves the old file or the new, never half of one. A
folder (a checkpoint) is written the same way under ``NAME.tmp``: :func:`temporary_folder` gives it
empty (a save killed half-way left it), :func:`replace_folder` puts it in place.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` then rename ``tmp`` to ``path`` in one step (see the module docstring); ``path``."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def temporary_folder(folder: Path) -> Path:
    """``folder``'s temporary name (``NAME.tmp``), created empty: what a save killed half-way left there is removed."""
    tmp = Path(folder).with_name(Path(folder).name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def replace_folder(tmp: Path, folder: Path) -> None:
    """Put the complete folder ``tmp`` in place of ``folder`` (an older one of that name is removed first)."""
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks (a data cache's key, a checkpoint's manifest, a run's data files).
    Not read again in this process while its size, mtime and inode are unchanged."""
    stat = path.stat()
    stamp = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if stamp in _DIGESTS:
        return _DIGESTS[stamp]
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    _DIGESTS[stamp] = h.hexdigest()
    return _DIGESTS[stamp]


#: a memo of :func:`file_digest`, by file identity (path, size, mtime, inode): a cache of what the bytes hash to, not a run's state
_DIGESTS: dict[tuple[Any, ...], str] = {}

"""A checkpoint's ``manifest.json``: every file's size and sha256, written last, so a folder whose
manifest is missing or does not match its files is never resumed from (:mod:`preftune.training.checkpoint`).

A checkpoint checked intact in this process is not hashed again while its files are untouched
(same sizes, modification times and inodes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from preftune.models.weights import WEIGHTS_FILE
from preftune.system.files import atomic_write, file_digest

MANIFEST_FILE = "manifest.json"
STATE_FILE = "state.json"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE and not p.name.endswith(".tmp"))


def write_manifest(folder: Path) -> None:
    """``manifest.json``: every file's size and sha256, written atomically (a temporary name, then a rename)."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_digest(p)} for p in _files(folder)}
    atomic_write(folder / MANIFEST_FILE, lambda tmp: tmp.write_text(json.dumps({"files": files}, indent=1)))


def manifest_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete, intact checkpoint (None when its manifest matches every file)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except FileNotFoundError:
        return f"no {MANIFEST_FILE} (an unfinished or damaged save)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {MANIFEST_FILE} cannot be read ({type(err).__name__}: {err})"
    stamps = []
    for name, entry in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            return f"'{name}' is missing"
        stat = path.stat()
        if not isinstance(entry, dict) or stat.st_size != entry.get("size"):
            return f"'{name}' has {stat.st_size} bytes, the manifest says {entry.get('size') if isinstance(entry, dict) else entry}"
        stamps.append((name, stat.st_size, stat.st_mtime_ns, stat.st_ino))
    key, stamp = str(folder.resolve()), ((folder / MANIFEST_FILE).stat().st_mtime_ns, tuple(stamps))
    if _INTACT.get(key) != stamp:  # checked in this process and not touched since: no second hashing pass
        for name, entry in sorted(files.items()):
            if file_digest(folder / name) != entry.get("sha256"):
                return f"'{name}' does not match its checksum in {MANIFEST_FILE} (changed or damaged since it was saved)"
        _INTACT[key] = stamp
    if STATE_FILE not in files or not ({WEIGHTS_FILE, "sharded/.metadata"} & set(files)):  # a sharded run's: DCP's files
        return f"its {MANIFEST_FILE} lists no {STATE_FILE} or {WEIGHTS_FILE}"
    return None


#: checkpoint folder -> the manifest's and files' (size, mtime, inode) when their checksums last matched in this process
_INTACT: dict[str, tuple[Any, ...]] = {}

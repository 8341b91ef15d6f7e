"""A checkpoint's ``manifest.json``: every file's size and sha256, written last, so a folder whose
manifest is missing or does not match its files is never resumed from (:mod:`preftune.training.checkpoint`).

A file whose bytes were hashed in this process is not read again while it is untouched (same
size, modification time and inode: :func:`preftune.system.files.file_digest`'s memo, the one
there is), so a second check of the same checkpoint costs a stat per file.
"""

from __future__ import annotations

import json
from pathlib import Path

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
    for name, entry in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            return f"'{name}' is missing"
        size = path.stat().st_size
        if not isinstance(entry, dict) or size != entry.get("size"):
            return f"'{name}' has {size} bytes, the manifest says {entry.get('size') if isinstance(entry, dict) else entry}"
    for name, entry in sorted(files.items()):  # every size first: a cut-short save is told without hashing
        if file_digest(folder / name) != entry.get("sha256"):
            return f"'{name}' does not match its checksum in {MANIFEST_FILE} (changed or damaged since it was saved)"
    if STATE_FILE not in files or not ({WEIGHTS_FILE, "sharded/.metadata"} & set(files)):  # a sharded run's: DCP's files
        return f"its {MANIFEST_FILE} lists no {STATE_FILE} or {WEIGHTS_FILE}"
    return None


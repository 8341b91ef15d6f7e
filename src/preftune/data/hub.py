"""Datasets by hub id, and folders in the hub's layout, as sources the readers take.

A data entry that is a file, or a folder written by ``datasets``' ``save_to_disk``, is read by
:mod:`preftune.data.readers` as before. A folder in the hub's layout (a ``README.md`` card and
data files: Parquet, JSON Lines, JSON, CSV) and a hub dataset id (``org/name``, resolved to its
snapshot in the hub cache by :mod:`preftune.system.hub`; offline with ``HF_HUB_OFFLINE=1`` or
``HF_DATASETS_OFFLINE=1``) are loaded with ``datasets.load_dataset`` on the local folder, with
``data.subset``, the split, and ``data.data_files``; no loading script is ever run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from preftune.data.readers import SAVE_TO_DISK_MARKERS, InMemory
from preftune.errors import DataError
from preftune.system.hub import looks_like_repo_id, snapshot


def resolve_source(entry: Any, *, split: str, subset: str | None = None, data_files: dict[str, str] | None = None) -> Any:
    """``entry`` as the readers take it: a path stays a path; a hub-layout folder or a hub dataset id
    becomes :class:`~preftune.data.readers.InMemory` rows of ``split``."""
    if not isinstance(entry, (str, Path)):
        return entry
    path = Path(entry).expanduser()
    if path.is_file() or (path.is_dir() and any((path / m).exists() for m in SAVE_TO_DISK_MARKERS)):
        return entry
    if path.is_dir():
        folder = path
    elif looks_like_repo_id(str(entry)):
        folder = snapshot(str(entry), "dataset", repo_type="dataset")
    else:
        return entry  # a missing file: the reader names it
    return InMemory(_load(folder, str(entry), split, subset, data_files or {}), f"{entry} [{split}]")


def _load(folder: Path, name: str, split: str, subset: str | None, data_files: dict[str, str]) -> Any:
    import datasets

    if any(folder.glob("*.py")):
        raise DataError("the dataset folder holds a loading script; preftune reads data files only, never runs a script",
                        file=name, reason="unsupported_extension")
    files = dict(data_files) or None
    try:
        return datasets.load_dataset(str(folder), name=subset, split=split, data_files=files)
    except ValueError as err:  # an unknown split or config names the ones there are
        raise DataError(f"cannot load split '{split}'{f' of subset {subset!r}' if subset else ''}: {err}",
                        file=name, reason="unreadable") from None
    except Exception as err:  # noqa: BLE001 - datasets' own errors for files it cannot read
        raise DataError(f"cannot load the dataset: {type(err).__name__}: {err}", file=name, reason="unreadable") from None

"""Tokenized data cached on disk, so a second run on the same data starts training in seconds.

What the key covers (a cached split is reused only when ALL of these are the same):

- the data: the sha256 of every file's bytes (not its name, size or mtime: a file rewritten with
  the same bytes hits, a file changed in place misses), in order;
- the tokenizer: its class, its full ``tokenizers`` serialization (vocabulary, merges, normaliser,
  pre-tokenizer, post-processor: so BOS/EOS handling too), its special tokens and chat template;
- every ``data`` setting that changes what is read or how it is tokenized (format, columns,
  system prompt, prompt marker, on_error, on_overflow, max_length, max_prompt_length,
  max_records, subset, split names, data_files) and what the stage makes of the records
  (pairs, demonstrations or unpaired; KTO's split_pairs); and this module's :data:`CACHE_VERSION`.

Settings applied after tokenization (eval_fraction, length grouping, prefix sharing) are not in
the key. Only local files are cached: data given in memory or read from a hub dataset is
tokenized every time. A cached split is one safetensors file (the token ids as int32, streamed
in while the records are tokenized, and the items' other fields; :mod:`preftune.data.store`)
and the data report in JSON, both put in place atomically; a warm load memory-maps the ids. A
file that cannot be read is a miss, recomputed and rewritten, never an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from preftune.config.schema import DataConfig
from preftune.data.store import ItemsWriter, TokenizedItems, open_items, start_file
from preftune.system.files import atomic_write, file_digest

#: 2: ids, offsets and fields in one safetensors file, memory-mapped (data/store.py); 3: the weight field
#: is read, chat completions are split from the whole conversation, KTO label counts are in the report
CACHE_VERSION = 3
#: the DataConfig fields that do NOT change the tokenized items (applied later, or the file list itself)
NOT_IN_KEY = ("train", "eval", "eval_fraction", "group_by_length", "prefix_sharing", "tokenized_cache_dir")


def source_digests(paths: Sequence[Any]) -> dict[str, str]:
    """sha256 of every local file among ``paths`` (a folder: each file in it), by path; hub ids and
    data given in memory have none. A run records them in its checkpoints, and a resume on changed
    data is refused."""
    found: dict[str, str] = {}
    for entry in paths:
        path = Path(entry).expanduser() if isinstance(entry, (str, Path)) else None
        if path is None or not path.exists():
            continue
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
        found.update({str(file): file_digest(file) for file in files})
    return found


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about ``tokenizer`` that decides its ids (see the module docstring)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = {"class": type(tokenizer).__name__, "special": getattr(tokenizer, "special_tokens_map", {}),
             "chat_template": getattr(tokenizer, "chat_template", None),
             "add_bos": getattr(tokenizer, "add_bos_token", None), "add_eos": getattr(tokenizer, "add_eos_token", None)}
    return hashlib.sha256((body + json.dumps(extra, sort_keys=True, default=str)).encode()).hexdigest()


def cache_key(paths: Sequence[Any], data: DataConfig, tokenizer: Any, *, records: str, split_pairs: bool) -> str | None:
    """The key of one split's tokenized items, or None when a source is not a local file."""
    if not paths or not all(isinstance(p, (str, Path)) and Path(p).expanduser().is_file() for p in paths):
        return None
    settings = {k: v for k, v in dataclasses.asdict(data).items() if k not in NOT_IN_KEY}
    h = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "records": records, "split_pairs": split_pairs,
                                   "settings": settings}, sort_keys=True, default=str).encode())
    for path in paths:
        h.update(file_digest(Path(path).expanduser()).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()[:32]


def _paths(cache_dir: str | Path, key: str) -> tuple[Path, Path]:
    folder = Path(cache_dir).expanduser()
    return folder / f"{key}.safetensors", folder / f"{key}.json"


def load(cache_dir: str | Path, key: str) -> tuple[TokenizedItems, dict[str, Any]] | None:
    """(items, data report as a dict) of a cached split, or None on a miss. The ids stay in the
    file, memory-mapped (:func:`preftune.data.store.open_items`)."""
    ids_path, meta_path = _paths(cache_dir, key)
    if not (ids_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta["version"] != CACHE_VERSION:
            return None
        items = open_items(ids_path)
        if items.kind != meta["kind"] or len(items) != meta["items"]:
            return None
        return items, meta["report"]
    except Exception:  # noqa: BLE001 - unreadable or damaged (json, mmap, a wrong header): a miss, recomputed and rewritten
        return None


STALE_AFTER_S = 600


def remove_stale(folder: Path) -> list[Path]:
    """Delete the temporary files (``*.tmpPID``) of writers whose process is gone (a run killed
    mid-write); a live process's are left alone, and so is a file written to in the last
    ``STALE_AFTER_S`` seconds (a writer on another machine sharing the folder). Returns what was removed."""
    import time

    from preftune.system.runfolder import alive

    removed = []
    for path in folder.glob("*.tmp*"):
        pid = path.name.rpartition(".tmp")[2]
        recent = True  # a file gone meanwhile: nothing to do
        with contextlib.suppress(OSError):
            recent = time.time() - path.stat().st_mtime < STALE_AFTER_S
        if pid.isdigit() and int(pid) != os.getpid() and not alive(int(pid)) and not recent:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class CacheWriter:
    """One split's items streamed into the cache as they are made: ``with CacheWriter(...) as w:
    w.add(item) ...; items = w.commit(report)``. The files appear (atomically) only at
    :meth:`commit`; leaving the block without it removes what was written."""

    def __init__(self, cache_dir: str | Path, key: str, kind: str) -> None:
        self.ids_path, self.meta_path = _paths(cache_dir, key)
        self.ids_path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(self.ids_path.parent)
        self.kind = kind
        self._tmp = self.ids_path.with_name(f"{self.ids_path.name}.tmp{os.getpid()}")
        self._file = self._tmp.open("w+b")
        start_file(self._file)
        self._writer = ItemsWriter(kind, self._file)

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)

    def add(self, item: Any) -> None:
        self._writer.add(item)

    def commit(self, report: dict[str, Any]) -> TokenizedItems:
        """Finish the files, put them in place, and return the items read back from the cache."""
        self._writer.finish_file()
        self._file.close()
        meta = json.dumps({"version": CACHE_VERSION, "kind": self.kind, "items": len(self._writer.columns), "report": report})
        os.replace(self._tmp, self.ids_path)  # streamed into its temporary file: renamed here, the metadata after it
        atomic_write(self.meta_path, lambda tmp: tmp.write_text(meta, encoding="utf-8"))
        return open_items(self.ids_path)

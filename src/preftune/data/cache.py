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
tokenized every time. A cached split stores the token ids in one safetensors file (int32, with
per-item lengths) and the rest (weights, labels, sources, the data report) in JSON, written
atomically; a file that cannot be read is a miss, recomputed and rewritten, never an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from preftune.config import DataConfig
from preftune.data.records import TokenizedPair, TokenizedUnpaired

CACHE_VERSION = 1
#: the DataConfig fields that do NOT change the tokenized items (applied later, or the file list itself)
NOT_IN_KEY = ("train", "eval", "eval_fraction", "group_by_length", "prefix_sharing", "tokenized_cache_dir")


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks (the cache key's data part; checkpoint manifests)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


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


def load(cache_dir: str | Path, key: str) -> tuple[list[Any], dict[str, Any]] | None:
    """(items, data report as a dict) of a cached split, or None on a miss."""
    from safetensors.torch import load_file

    ids_path, meta_path = _paths(cache_dir, key)
    if not (ids_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        tensors = load_file(str(ids_path))
        flat, lengths = tensors["ids"].tolist(), tensors["lengths"].tolist()
        cls = TokenizedPair if meta["kind"] == "pairs" else TokenizedUnpaired
        fields = meta["id_fields"]
        items, start = [], 0
        for row, extra in zip(lengths, meta["items"], strict=True):
            ids = {}
            for name, n in zip(fields, row, strict=True):
                ids[name], start = flat[start : start + n], start + n
            items.append(cls(**ids, **extra))
        if start != len(flat):
            return None
        return items, meta["report"]
    except Exception:  # noqa: BLE001 - unreadable (safetensors raises its own error type): a miss, recomputed and rewritten
        return None


def save(cache_dir: str | Path, key: str, items: Sequence[Any], report: dict[str, Any]) -> None:
    """Write a split's items and report (atomically: a reader never sees half a file)."""
    import torch
    from safetensors.torch import save_file

    pairs = not items or isinstance(items[0], TokenizedPair)
    fields = ("prompt_ids", "chosen_ids", "rejected_ids") if pairs else ("prompt_ids", "completion_ids")
    flat: list[int] = []
    lengths, extras = [], []
    for item in items:
        row = {f.name: getattr(item, f.name) for f in dataclasses.fields(item)}
        lengths.append([len(row[name]) for name in fields])
        for name in fields:
            flat.extend(row[name])
        extras.append({k: v for k, v in row.items() if k not in fields})
    ids_path, meta_path = _paths(cache_dir, key)
    ids_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_ids, tmp_meta = (path.with_name(f"{path.name}.tmp{os.getpid()}") for path in (ids_path, meta_path))
    save_file({"ids": torch.tensor(flat, dtype=torch.int32),
               "lengths": torch.tensor(lengths, dtype=torch.int64).reshape(len(items), len(fields))}, str(tmp_ids))
    tmp_meta.write_text(json.dumps({"version": CACHE_VERSION, "kind": "pairs" if pairs else "unpaired", "id_fields": fields,
                                    "items": extras, "report": report}), encoding="utf-8")
    os.replace(tmp_ids, ids_path)
    os.replace(tmp_meta, meta_path)

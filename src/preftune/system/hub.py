"""Hugging Face hub ids: a model or dataset named ``org/name`` resolved to a local snapshot folder.

The hub cache is the one in force when called (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub``). Only the files preftune reads are fetched (never pickled
weights). With ``HF_HUB_OFFLINE=1`` (or, for datasets, ``HF_DATASETS_OFFLINE=1``) the hub is
not asked and the cache must hold the repo. What cannot be found is one clear line: first that
there is no such local folder (relative to which folder, :func:`no_local`), then, for a name that
can be a hub id, which cache was looked in and how to fill it (``hf download``, the CLI that
huggingface_hub ships).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from preftune.errors import PreftuneError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

#: What a model needs from a hub repo: config, generation config, tokenizer, safetensors weights.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
#: What a dataset repo offers that `datasets` reads without running code.
DATASET_FILES = ["README.md", "*.json", "*.jsonl", "*.csv", "*.tsv", "*.parquet", "*.arrow", "*.gz", "*.txt", "**/*"]


def env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> Path:
    """The hub cache in force now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def looks_like_repo_id(name: str) -> bool:
    """``org/name`` or ``name``: letters, digits, ``._-``; not a path that exists, not ``..``."""
    return bool(_REPO_ID.match(name)) and ".." not in name and not Path(name).expanduser().exists()


def no_local(path: str, kind: str = "folder") -> str:
    """``no folder 'X' (relative to DIR)``: what was not found, and where a relative path was looked for."""
    where = "" if Path(path).expanduser().is_absolute() else f" (relative to {Path.cwd()})"
    return f"no {kind} '{path}'{where}"


def snapshot(repo_id: str, what: str, *, repo_type: str = "model", patterns: list[str] | None = None, hint: str = "") -> Path:
    """The local snapshot folder of ``repo_id`` (fetched into the cache unless offline); ``patterns``
    narrows what is fetched (the planner needs ``config.json`` only, never the weights). ``hint``
    follows the missing local path in the message (where such a folder comes from)."""
    from huggingface_hub import snapshot_download

    offline = env_true("HF_HUB_OFFLINE") or (repo_type == "dataset" and env_true("HF_DATASETS_OFFLINE"))
    cache = hub_cache_dir()
    patterns = patterns or (MODEL_FILES if repo_type == "model" else DATASET_FILES)
    try:
        folder = snapshot_download(repo_id, repo_type=repo_type, cache_dir=str(cache), local_files_only=offline,
                                   allow_patterns=patterns)
    except Exception as err:  # noqa: BLE001 - not found, no network, gated, ...: all mean "not available here"
        asked = "offline, so the hub was not asked" if offline else f"the hub could not provide it ({type(err).__name__})"
        download = f"hf download {'--repo-type dataset ' if repo_type == 'dataset' else ''}{repo_id}"
        local = no_local(repo_id, "folder" if repo_type == "model" else "file or folder")
        raise PreftuneError(
            f"{what}: {local}{hint}; as a Hugging Face hub id, the cache at {cache} does not hold it ({asked}): download it "
            f"where there is network (`{download}`) into that cache, or point HF_HUB_CACHE at a cache that has it."
        ) from None
    return Path(folder)

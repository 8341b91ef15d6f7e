"""Where a model or tokenizer lives (a local folder, or a Hugging Face hub id resolved through the
local cache), and the one tokenizer loader. Torch-free, so `preftune data inspect --tokenizer`
stays light.

A name that is not a local folder and looks like a hub id (``org/name`` or ``name``) is resolved
by :mod:`preftune.system.hub` to its snapshot in the hub cache (config, tokenizer and safetensors files
only; with ``HF_HUB_OFFLINE=1`` from the cache alone), then loaded from that folder exactly as a
local folder is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError
from preftune.system.hub import looks_like_repo_id, no_local, snapshot

__all__ = ["check_folder", "load_tokenizer"]


def check_folder(path: str, what: str) -> Path:
    """``path`` as a local folder (a hub id resolved to its cached snapshot), or a PreftuneError
    in one line: what was looked for, where, and how to get it."""
    folder = Path(str(path)).expanduser()
    if not str(path):
        raise PreftuneError(f"no {what} given: set model.path to a model folder or a Hugging Face hub id.")
    if folder.is_dir():
        return folder
    hint = tiny_hint(str(path))
    if not looks_like_repo_id(str(path)):
        raise PreftuneError(f"{what}: {no_local(str(path))}{hint}; nor can it be a Hugging Face hub id (org/name).")
    return snapshot(str(path), what, hint=hint)


def tiny_hint(path: str) -> str:
    """Where the shipped configs/*-tiny.yaml's model comes from, when ``path`` is that folder; else ''."""
    from preftune.models.tiny import TINY_MODEL

    return " (the model of configs/*-tiny.yaml: `preftune tiny` writes it, in seconds)" if Path(path) == Path(TINY_MODEL) else ""


def _looks_like_tokenizer(name: str) -> bool:
    return name.startswith(("tokenizer", "vocab", "spiece", "merges")) or name.endswith((".model", ".tiktoken"))


def load_tokenizer(path: str, *, trust_remote_code: bool = False, what: str = "tokenizer folder") -> Any:
    """A tokenizer from a local folder or a hub id; it gets a pad token (EOS) when it has none.

    Padding is always masked by position, never by token id, so reusing EOS as the pad token
    cannot hide a real EOS from the loss.
    """
    from transformers import AutoTokenizer

    folder = check_folder(path, what)
    names = sorted(p.name for p in folder.iterdir())
    if not any(_looks_like_tokenizer(name) for name in names):
        held = f"it holds only {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}" if names else "it is empty"
        raise PreftuneError(f"{what} '{folder}' holds no tokenizer ({held}); expected tokenizer.json or "
                            "tokenizer_config.json as written by save_pretrained.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - OSError, ValueError, tokenizers' own: all mean "not a tokenizer"
        raise PreftuneError(f"could not load a tokenizer: '{folder}' is not a tokenizer folder (expected tokenizer.json or "
                            f"tokenizer_config.json as written by save_pretrained): {err}") from None
    if tokenizer.eos_token_id is None:
        raise PreftuneError(f"the tokenizer in '{folder}' has no EOS token; preftune ends every completion with EOS.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

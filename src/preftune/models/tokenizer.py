"""The one tokenizer loader (torch-free, so `preftune data inspect --tokenizer` stays light)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError

__all__ = ["check_folder", "load_tokenizer"]


def check_folder(path: str, what: str) -> Path:
    """``path`` as a folder, or a PreftuneError naming ``what`` was expected there."""
    folder = Path(path).expanduser()
    if not str(path):
        raise PreftuneError(f"no {what} given: set model.path to a local model folder.")
    if not folder.is_dir():
        raise PreftuneError(f"{what} '{path}' is not a folder (models load from local folders only).")
    return folder


def load_tokenizer(path: str, *, trust_remote_code: bool = False) -> Any:
    """A tokenizer from a local folder; it gets a pad token (EOS) when it has none.

    Padding is always masked by position, never by token id, so reusing EOS as the pad token
    cannot hide a real EOS from the loss.
    """
    from transformers import AutoTokenizer

    folder = check_folder(path, "tokenizer folder")
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

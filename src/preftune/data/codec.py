"""Encoding texts with a tokenizer: what it puts around a text (BOS), EOS once, batched in Rust.

:class:`Codec` learns once which special tokens a tokenizer adds before a text, so prompts get
BOS exactly once (not again when the text already holds it) and completions end with EOS
exactly once; :func:`encode_texts` encodes a list in one batched call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from preftune.errors import TokenizationError


@dataclass
class Codec:
    """What a tokenizer puts around a text, learned once, and batched encoding."""

    tokenizer: Any
    prefix: list[int]  # special tokens the post-processor puts before a text (usually [BOS])
    bos_id: int | None
    eos_id: int
    eos_text: str

    @classmethod
    def of(cls, tokenizer: Any) -> Codec:
        eos_id = getattr(tokenizer, "eos_token_id", None)
        if eos_id is None:
            raise TokenizationError("the tokenizer has no EOS token; preftune ends every completion with EOS.")
        probe = "preftune probe"
        plain = encode_texts(tokenizer, [probe], special=False)[0]
        full = encode_texts(tokenizer, [probe], special=True)[0]
        starts = [k for k in range(len(full) - len(plain) + 1) if full[k : k + len(plain)] == plain]
        if not plain or not starts:
            raise TokenizationError("cannot tell which special tokens this tokenizer adds around a text.")
        return cls(tokenizer, full[: starts[0]], getattr(tokenizer, "bos_token_id", None), eos_id, tokenizer.eos_token)

    def closes_turn(self, ids: list[int]) -> bool:
        """Whether ``ids`` end with a special token, whitespace after it aside."""
        special = set(getattr(self.tokenizer, "all_special_ids", [])) | {self.eos_id}
        end = len(ids)
        while end and ids[end - 1] not in special and not self.tokenizer.decode(ids[end - 1 : end]).strip():
            end -= 1
        return bool(end) and ids[end - 1] in special

    def trim_after_eos(self, text: str) -> str:
        """Drop whitespace after a final EOS (ChatML's ``<|im_end|>\\n``) so EOS is last."""
        stripped = text.rstrip()
        return stripped if stripped.endswith(self.eos_text) else text

    def prompts(self, texts: list[str], sources: list[str], chat: list[bool] | None = None) -> list[list[int]]:
        """Prompt ids: a plain-text prompt gets the tokenizer's prefix (BOS) unless its text brings
        it; a chat-rendered prompt is the template's text alone, as ``apply_chat_template`` gives it."""
        n = len(self.prefix)
        chat = chat or [False] * len(texts)
        out = []
        for ids, where, templated in zip(encode_texts(self.tokenizer, texts, special=False), sources, chat):
            if not templated and not (n and ids[:n] == self.prefix):  # the text brings its own BOS: do not double it
                ids = self.prefix + ids
            if self.bos_id is not None and ids[:2] == [self.bos_id, self.bos_id]:
                raise TokenizationError(f"{where}: the prompt starts with BOS twice; its text already holds two.")
            out.append(ids)
        return out

    def completions(self, texts: list[str], sources: list[str], chat: list[bool] | None = None) -> list[list[int]]:
        """Completion ids ending with EOS once; a chat turn that the template closes with a special
        token of its own (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, EOS) is kept as rendered."""
        chat = chat or [False] * len(texts)
        return [self.finish(ids, where, templated)
                for ids, where, templated in zip(encode_texts(self.tokenizer, texts, special=False), sources, chat)]

    def finish(self, ids: list[int], where: str, templated: bool) -> list[int]:
        """A completion's ids ending with EOS once (a templated turn closed by a special token: as is)."""
        if templated and self.closes_turn(ids):
            return ids
        if not ids or ids[-1] != self.eos_id:
            return ids + [self.eos_id]
        if len(ids) >= 2 and ids[-2] == self.eos_id:
            raise TokenizationError(f"{where}: a completion ends with EOS twice ({self.eos_text!r} in its text).")
        return ids


def encode_texts(tokenizer: Any, texts: list[str], *, special: bool) -> list[list[int]]:
    """Batched encoding: the list is encoded in parallel, in Rust, for a fast tokenizer."""
    if not texts:
        return []
    if _rust_backend_agrees(tokenizer, texts):
        # About 1.5x faster than tokenizer(texts): no offsets, no BatchEncoding to build.
        return [e.ids for e in tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=special)]
    # verbose=False: lengths over model_max_length are our truncation's business, not a warning.
    encoded = tokenizer(texts, add_special_tokens=special, return_attention_mask=False, verbose=False)
    return [list(ids) for ids in encoded["input_ids"]]


def _rust_backend_agrees(tokenizer: Any, texts: list[str]) -> bool:
    """Whether the Rust tokenizer alone gives what ``tokenizer(texts)`` gives.

    A Python subclass may add behaviour around the backend, and a backend loaded with padding
    or truncation switched on would pad or cut; so the shortcut is taken only when neither is
    on and a sample of the texts encodes identically both ways.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.padding is not None or backend.truncation is not None:
        return False
    if not hasattr(backend, "encode_batch_fast"):
        return False
    sample = texts[:4] + texts[-4:]
    for special in (False, True):
        slow = tokenizer(sample, add_special_tokens=special, return_attention_mask=False, verbose=False)["input_ids"]
        fast = [e.ids for e in backend.encode_batch_fast(sample, add_special_tokens=special)]
        if [list(ids) for ids in slow] != fast:
            return False
    return True

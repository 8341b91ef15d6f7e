"""Tokenize only what can be kept: a character window around each text before it is encoded.

Truncation keeps at most ``max_length`` tokens of any text: the START of a completion, the END
of a prompt (and its first token, BOS). No token covers more characters than the longest string
in the tokenizer's vocabulary (``longest``; a byte-level token's string has one character per
byte, so at least as many as the characters it covers), so ``(max_length + SLACK) x longest``
characters always hold more tokens than can be kept. A text longer than that is cut to the
window (a completion: its first characters; a prompt: its first ``SLACK x longest`` characters,
for the tokens a cut prompt keeps at its front, and its last window) before it is encoded, so
a 50 MB record costs what a window costs. ``SLACK`` tokens on each side of a cut absorb the
merges that the cut changes; tokenization is local (pre-tokenizers split the text, merges join
neighbours), so the tokens that are kept are those of the whole text. A window that still
yields too few tokens (a normalizer that deletes characters) is encoded whole instead
(:func:`too_short`). Records longer than the window are measured in ``report.tokens`` by their
window's length (a lower bound); a check that looks at the part of a text truncation drops
(BOS or EOS written twice there) is not made on it.
"""

from __future__ import annotations

from typing import Any

#: tokens of margin on each side of a cut
SLACK = 32


def longest_token(tokenizer: Any) -> int:
    """The most characters one token's string holds (added and special tokens included)."""
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError):
        return 0
    return max((len(token) for token in vocab), default=0)


class Window:
    """How many characters of a text can matter under ``max_length`` (0: no window)."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        longest = longest_token(tokenizer)
        self.max_length = max_length
        self.head = SLACK * longest
        self.chars = (max_length + SLACK) * longest

    def completion(self, text: str) -> str:
        """A completion keeps its start."""
        return text[: self.chars] if self.chars and len(text) > self.chars else text

    def prompt(self, text: str) -> str:
        """A prompt keeps its end, and its first tokens (BOS stays at the front of a cut prompt)."""
        if not self.chars or len(text) <= self.head + self.chars:
            return text
        return text[: self.head] + text[-self.chars :]

    def too_short(self, windowed: str, original: str, ids: list[int]) -> bool:
        """A cut text must still hold more tokens than truncation keeps; otherwise encode it whole."""
        return windowed is not original and len(ids) <= self.max_length

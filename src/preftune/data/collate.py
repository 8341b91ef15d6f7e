"""Tokenized records -> padded tensors, and the length-grouped batch sampler (torch only).

Batches are RIGHT-padded. ``labels`` are aligned with ``input_ids`` (not shifted: the log-prob
code shifts), hold the completion tokens, EOS included, and are ``-100`` on the prompt and on
padding, so summing log-probs over ``labels != -100`` sums over exactly the completion.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

import torch

from preftune.data.records import TokenizedPair, TokenizedUnpaired
from preftune.errors import TokenizationError

#: The label of a position that is not scored (PyTorch's cross-entropy ignore_index).
IGNORE_INDEX = -100


def collate_pairs(
    pairs: list[TokenizedPair], pad_token_id: int, *, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """One concatenated batch of B pairs: rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected.

    Returns ``input_ids``, ``attention_mask``, ``labels`` of shape (2B, L); ``preference``,
    ``weight`` and ``margin`` (B,) float32; ``index`` (B,) int64. Chosen and rejected go through the model in
    one forward pass (DESIGN.md, "Where speed comes from").
    """
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    batch = _pad(rows, pad_token_id, pad_to_multiple_of)
    batch["preference"] = torch.tensor([p.preference for p in pairs], dtype=torch.float32)
    batch["weight"] = torch.tensor([p.weight for p in pairs], dtype=torch.float32)
    batch["margin"] = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    batch["index"] = torch.tensor([p.index for p in pairs], dtype=torch.long)
    return batch


def collate_unpaired(
    items: list[TokenizedUnpaired], pad_token_id: int, *, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """A batch of N unpaired (KTO) examples: input_ids/attention_mask/labels (N, L), ``desirable``
    (N,) bool, ``weight`` (N,) float32, ``index`` (N,) int64."""
    if not items:
        raise ValueError("collate_unpaired needs at least one example")
    batch = _pad([(x.prompt_ids, x.completion_ids) for x in items], pad_token_id, pad_to_multiple_of)
    batch["desirable"] = torch.tensor([x.desirable for x in items], dtype=torch.bool)
    batch["weight"] = torch.tensor([x.weight for x in items], dtype=torch.float32)
    batch["index"] = torch.tensor([x.index for x in items], dtype=torch.long)
    return batch


def _pad(
    rows: list[tuple[list[int], list[int]]], pad_token_id: int, pad_to_multiple_of: int | None
) -> dict[str, torch.Tensor]:
    if pad_token_id is None:
        raise TokenizationError("the tokenizer has no pad token; set one (preftune's loader uses EOS).")
    width = max(len(prompt) + len(completion) for prompt, completion in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids, mask, labels = [], [], []
    for prompt, completion in rows:
        used = len(prompt) + len(completion)
        pad = width - used
        input_ids.append(prompt + completion + [pad_token_id] * pad)
        mask.append([1] * used + [0] * pad)
        labels.append([IGNORE_INDEX] * len(prompt) + completion + [IGNORE_INDEX] * pad)
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


class LengthGroupedBatchSampler:
    """Batches of indices, of similar lengths when ``group_by_length``, in a random order.

    Per epoch: shuffle all indices (seeded by ``(seed, epoch)``), cut them into mega-chunks of
    ``mega_batches * batch_size``, sort each chunk by length (longest first), cut it into batches,
    then shuffle the order of the batches. Padding becomes rare while which examples share a batch,
    and in which order batches come, stay random. The batches are a pure function of
    ``(lengths, batch_size, seed, epoch)``, so a run resumed mid-epoch skips the first k
    batches and gets the same later batches as an uninterrupted run. Only the last batch of an
    epoch can be short; ``drop_last`` leaves it out. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        group_by_length: bool = True,
        drop_last: bool = False,
        mega_batches: int = 50,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if mega_batches < 1:
            raise ValueError(f"mega_batches must be at least 1, got {mega_batches}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.drop_last = drop_last
        self.mega_batches = mega_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose batches ``__iter__`` yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        # A string seed is hashed with SHA-512 by `random`, independent of PYTHONHASHSEED.
        rng = random.Random(f"preftune-batches:{self.seed}:{self.epoch}")
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        if self.group_by_length:
            chunk = self.batch_size * self.mega_batches
            # sorted() is stable: equal lengths keep their shuffled order.
            order = [
                i
                for start in range(0, len(order), chunk)
                for i in sorted(order[start : start + chunk], key=lambda i: -self.lengths[i])
            ]
        batches = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle and self.group_by_length:
            rng.shuffle(batches)
        yield from batches


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of the padded token slots that are padding, when each batch pads to its longest."""
    slots = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches if batch)
    used = sum(lengths[i] for batch in batches for i in batch)
    return (slots - used) / slots if slots else 0.0

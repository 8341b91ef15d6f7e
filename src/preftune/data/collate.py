"""Every collator (tokenized records -> padded tensors), and the length-grouped batch sampler.

Three row layouts, one contract: ``labels`` are aligned with ``input_ids`` (not shifted: the
log-prob code shifts), hold the completion tokens, EOS included, and are ``IGNORE_INDEX`` (-100)
on prompts and padding, so summing log-probs over ``labels != IGNORE_INDEX`` sums over exactly
the completions. Rows are RIGHT-padded.

- :func:`collate_pairs` / :func:`collate_unpaired`: one row per sequence (chosen and rejected
  rows of a pair in one concatenated batch);
- :func:`collate_prefix_shared`: one row per pair, ``prompt | chosen | rejected``, with a block
  attention mask and restarted positions, so the prompt is encoded once and every completion
  token sees exactly the context it sees in the plain layout: prompt and chosen tokens attend
  causally to the prompt and the chosen tokens before them; rejected tokens attend to the prompt
  and the rejected tokens before them, never to chosen; the rejected part's positions restart at
  ``len(prompt)``; padding attends only to itself (a row with nothing to attend to gives NaN).
  ``labels`` are (2B, W): chosen tokens in rows 0..B-1, rejected in B..2B-1, each at its place in
  the shared row; :class:`~preftune.models.scorers.SharedPrefixLogps` scores them;
- :func:`collate_packed`: several SFT examples per row, positions restarting per example, a
  block-diagonal causal mask, so the loss is exactly the unpacked one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from preftune.data.records import TokenizedPair, TokenizedUnpaired
from preftune.errors import PreftuneError, TokenizationError
from preftune.logprobs import IGNORE_INDEX


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


#: Attention implementations that take an arbitrary 4D mask tensor.
MASKED_ATTENTION = ("sdpa", "eager")


def collate_prefix_shared(
    pairs: list[TokenizedPair], pad_token_id: int, *, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """One row per pair, ``prompt | chosen | rejected``, right padded (the layout: module docstring).

    Returns ``input_ids`` (B, W), ``attention_mask`` (B, 1, W, W) bool, ``position_ids`` (B, W),
    ``labels`` (2B, W); ``preference``, ``weight``, ``margin`` (B,) float32, ``index`` (B,) int64 as
    :func:`~preftune.data.collate.collate_pairs`; and ``real_tokens`` (B,): ``2 * prompt + chosen
    + rejected``, the tokens the plain layout would hold, so throughput is counted alike.
    """
    if not pairs:
        raise ValueError("collate_prefix_shared needs at least one pair")
    if pad_token_id is None:
        raise TokenizationError("the tokenizer has no pad token; set one (preftune's loader uses EOS).")
    for pair in pairs:
        if not pair.prompt_ids:
            # nothing would predict the first rejected token (nor, in the plain layout, the first chosen one)
            raise PreftuneError(f"prefix sharing needs a non-empty prompt (pair {pair.index}, {pair.source or 'no source'}).")
        if not pair.chosen_ids or not pair.rejected_ids:
            raise PreftuneError(f"pair {pair.index} has an empty completion; tokenization never produces one.")
    rows = len(pairs)
    width = max(p.shared_length for p in pairs)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((rows, width), dtype=torch.long)
    labels = torch.full((2 * rows, width), IGNORE_INDEX, dtype=torch.long)
    # segment: 0 prompt, 1 chosen, 2 rejected, -1 padding
    segment = torch.full((rows, width), -1, dtype=torch.long)
    for b, p in enumerate(pairs):
        n_prompt, n_chosen, n_rejected = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        chosen_end = n_prompt + n_chosen
        end = chosen_end + n_rejected
        input_ids[b, :end] = torch.tensor(p.prompt_ids + p.chosen_ids + p.rejected_ids)
        position_ids[b, :chosen_end] = torch.arange(chosen_end)
        position_ids[b, chosen_end:end] = torch.arange(n_prompt, n_prompt + n_rejected)
        labels[b, n_prompt:chosen_end] = input_ids[b, n_prompt:chosen_end]
        labels[rows + b, chosen_end:end] = input_ids[b, chosen_end:end]
        segment[b, :n_prompt] = 0
        segment[b, n_prompt:chosen_end] = 1
        segment[b, chosen_end:end] = 2
    return {
        "input_ids": input_ids,
        "attention_mask": block_attention_mask(segment),
        "position_ids": position_ids,
        "labels": labels,
        "preference": torch.tensor([p.preference for p in pairs], dtype=torch.float32),
        "weight": torch.tensor([p.weight for p in pairs], dtype=torch.float32),
        "margin": torch.tensor([p.margin for p in pairs], dtype=torch.float32),
        "index": torch.tensor([p.index for p in pairs], dtype=torch.long),
        "real_tokens": torch.tensor(
            [p.shared_length + len(p.prompt_ids) for p in pairs], dtype=torch.long
        ),
    }


def block_attention_mask(segment: torch.Tensor) -> torch.Tensor:
    """(B, 1, W, W) bool from segment ids (B, W) (0 prompt, 1 chosen, 2 rejected, -1 padding).

    Causal everywhere; a rejected query never sees a chosen key; padding sees only itself.
    """
    width = segment.shape[1]
    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool, device=segment.device))
    allowed = causal & (query >= 0) & (key >= 0) & ~((query == 2) & (key == 1))
    allowed |= torch.eye(width, dtype=torch.bool, device=segment.device) & (query < 0)
    return allowed[:, None]


def pack(items: Sequence[TokenizedUnpaired], max_length: int) -> list[list[TokenizedUnpaired]]:
    """Greedy first-fit-decreasing packing of examples into rows of at most ``max_length`` tokens.

    Deterministic (ties keep input order). An example longer than ``max_length`` cannot exist
    here: tokenization already fitted every example.
    """
    order = sorted(range(len(items)), key=lambda i: -items[i].length)
    bins: list[list[TokenizedUnpaired]] = []
    room: list[int] = []
    for i in order:
        n = items[i].length
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(items[i])
                room[b] -= n
                break
        else:
            bins.append([items[i]])
            room.append(max_length - n)
    return bins


def collate_packed(packs: list[list[TokenizedUnpaired]], pad_token_id: int, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Rows of packed examples: ``input_ids``, ``labels`` (-100 on prompts and padding),
    ``position_ids`` restarting per example, and a 4D additive attention mask (0 = attend,
    dtype-min = blocked) that is causal within each example and blocks everything across."""
    width = max(sum(x.length for x in row) for row in packs)
    rows = len(packs)
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((rows, width), dtype=torch.long)
    segment = torch.full((rows, width), -1, dtype=torch.long)
    for r, row in enumerate(packs):
        start = 0
        for s, item in enumerate(row):
            if not item.prompt_ids:
                # the first completion token would be predicted from the previous example
                raise PreftuneError(f"packing needs a non-empty prompt (record {item.source}); set sft.packing=false")
            ids = item.prompt_ids + item.completion_ids
            end = start + len(ids)
            input_ids[r, start:end] = torch.tensor(ids)
            labels[r, start + len(item.prompt_ids):end] = torch.tensor(item.completion_ids)
            position_ids[r, start:end] = torch.arange(len(ids))
            segment[r, start:end] = s
            start = end
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    allowed = causal & (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    allowed |= torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves: no all-blocked row (NaN)
    mask = torch.zeros((rows, 1, width, width), dtype=dtype).masked_fill(~allowed[:, None], torch.finfo(dtype).min)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "position_ids": position_ids,
            "weight": torch.ones(rows), "examples": torch.tensor([len(row) for row in packs]),
            "real_tokens": torch.tensor([sum(x.length for x in row) for row in packs])}

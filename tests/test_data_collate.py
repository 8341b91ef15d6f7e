"""collate.py: padded batches, label masks, and the length-grouped batch sampler."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from preftune.data.collate import (
    LengthGroupedBatchSampler,
    collate_pairs,
    collate_unpaired,
    padding_fraction,
)
from preftune.data.records import PreferenceExample, TokenizedPair, TokenizedUnpaired
from preftune.data.tokenize import tokenize_pairs
from preftune.errors import TokenizationError
from preftune.logprobs import IGNORE_INDEX

PAD = 0


def make_pairs() -> list[TokenizedPair]:
    return [
        TokenizedPair([1, 10, 11], [20, 2], [30, 31, 32, 2], index=7, preference=1.0, weight=1.0),
        TokenizedPair([1, 12], [21, 22, 23, 24, 25, 2], [2], index=3, preference=0.8, weight=0.5),
        TokenizedPair([1], [26, 2], [33, 2], index=0, preference=0.6, weight=2.0),
    ]


def test_pair_batch_layout_chosen_rows_first() -> None:
    pairs = make_pairs()
    batch = collate_pairs(pairs, PAD)
    b, width = len(pairs), max(p.length for p in pairs)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["labels"].shape == (2 * b, width)
    for i, p in enumerate(pairs):
        for row, completion in ((i, p.chosen_ids), (b + i, p.rejected_ids)):
            used = len(p.prompt_ids) + len(completion)
            assert batch["input_ids"][row].tolist() == p.prompt_ids + completion + [PAD] * (width - used)
            assert batch["attention_mask"][row].tolist() == [1] * used + [0] * (width - used)
            labels = batch["labels"][row]
            assert labels[: len(p.prompt_ids)].eq(IGNORE_INDEX).all() and labels[used:].eq(IGNORE_INDEX).all()
            assert labels[labels != IGNORE_INDEX].tolist() == completion
    assert batch["preference"].tolist() == pytest.approx([1.0, 0.8, 0.6]) and batch["preference"].dtype == torch.float32
    assert batch["weight"].tolist() == [1.0, 0.5, 2.0] and batch["weight"].dtype == torch.float32
    assert batch["index"].tolist() == [7, 3, 0] and batch["index"].dtype == torch.long
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long


def test_pad_to_multiple_of() -> None:
    assert max(p.length for p in make_pairs()) == 8
    batch = collate_pairs(make_pairs(), PAD, pad_to_multiple_of=3)
    assert batch["input_ids"].shape == (6, 9) and batch["attention_mask"][:, 8].eq(0).all()
    assert batch["labels"][:, 8].eq(IGNORE_INDEX).all() and batch["input_ids"][:, 8].eq(PAD).all()
    assert collate_pairs(make_pairs(), PAD, pad_to_multiple_of=4)["input_ids"].shape == (6, 8)


def test_unpaired_batch() -> None:
    items = [
        TokenizedUnpaired([1, 5], [6, 7, 2], True, index=4, weight=1.5),
        TokenizedUnpaired([1, 5, 8, 9], [2], False, index=1),
    ]
    batch = collate_unpaired(items, PAD)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2], [1, 5, 8, 9, 2]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7, 2], [-100, -100, -100, -100, 2]]
    assert batch["desirable"].tolist() == [True, False] and batch["desirable"].dtype == torch.bool
    assert batch["weight"].tolist() == [1.5, 1.0] and batch["index"].tolist() == [4, 1]


def test_labels_are_exactly_the_tokenized_completions() -> None:
    from preftune.models.tiny import (
        synthetic_corpus,
        synthetic_preferences,
        train_tokenizer,
    )

    tok = train_tokenizer(synthetic_corpus(), vocab_size=300)
    records = synthetic_preferences(12, seed=4)
    examples = [PreferenceExample(r["prompt"], r["chosen"], r["rejected"]) for r in records]
    pairs = tokenize_pairs(examples, tok, max_length=64)
    batch = collate_pairs(pairs, tok.pad_token_id)
    n = len(pairs)
    for i, example in enumerate(examples):
        for row, text in ((i, example.chosen), (n + i, example.rejected)):
            labels = batch["labels"][row]
            completion = labels[labels != IGNORE_INDEX].tolist()
            assert completion[-1] == tok.eos_token_id and tok.decode(completion[:-1]) == text
            ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
            assert tok.decode(ids, skip_special_tokens=True) == example.prompt + text


def test_empty_batch_and_missing_pad_are_errors() -> None:
    with pytest.raises(ValueError):
        collate_pairs([], PAD)
    with pytest.raises(TokenizationError, match="pad token"):
        collate_pairs(make_pairs(), None)


# --------------------------------------------------------------------------- the sampler
def varied_lengths(n: int = 1000, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(5, 600) for _ in range(n)]


@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("n, batch_size", [(1000, 8), (103, 10), (5, 16)])
def test_every_index_once_per_epoch(group: bool, shuffle: bool, n: int, batch_size: int) -> None:
    sampler = LengthGroupedBatchSampler(varied_lengths(n), batch_size, shuffle=shuffle, group_by_length=group)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(i for batch in batches for i in batch) == list(range(n))
        assert len(batches) == len(sampler) == -(-n // batch_size)
        assert sum(len(b) < batch_size for b in batches) == (n % batch_size > 0)


def test_drop_last_leaves_out_only_the_short_batch() -> None:
    sampler = LengthGroupedBatchSampler(varied_lengths(103), 10, drop_last=True, seed=2)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 10 and all(len(b) == 10 for b in batches)
    assert len(set(itertools.chain(*batches))) == 100


def test_deterministic_per_seed_and_epoch() -> None:
    lengths = varied_lengths()

    def batches(seed: int, epoch: int) -> list[list[int]]:
        sampler = LengthGroupedBatchSampler(lengths, 8, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert batches(0, 1) == batches(0, 1)
    assert batches(0, 1) != batches(0, 2)
    assert batches(0, 1) != batches(1, 1)


def test_grouping_reduces_padding_and_keeps_the_order_random() -> None:
    lengths = varied_lengths(2000)
    grouped = list(LengthGroupedBatchSampler(lengths, 8, seed=0))
    ungrouped = list(LengthGroupedBatchSampler(lengths, 8, seed=0, group_by_length=False))
    assert padding_fraction(grouped, lengths) < padding_fraction(ungrouped, lengths) / 5
    longest = [max(lengths[i] for i in batch) for batch in grouped]
    # Batches are sorted within mega-chunks, then shuffled: their lengths no longer run downhill.
    downhill = sum(a >= b for a, b in zip(longest, longest[1:])) / (len(longest) - 1)
    assert 0.3 < downhill < 0.7
    # Batch composition changes across epochs, not only the batch order.
    sampler = LengthGroupedBatchSampler(lengths, 8, seed=0)
    sampler.set_epoch(1)
    assert {frozenset(b) for b in sampler} != {frozenset(b) for b in grouped}


def test_no_shuffle_no_grouping_is_sequential() -> None:
    sampler = LengthGroupedBatchSampler([3, 1, 2, 5, 4], 2, shuffle=False, group_by_length=False)
    assert list(sampler) == [[0, 1], [2, 3], [4]]
    sorted_chunks = LengthGroupedBatchSampler([3, 1, 2, 5, 4], 2, shuffle=False, mega_batches=1)
    assert list(sorted_chunks) == [[0, 1], [3, 2], [4]]


def test_resume_skips_batches_and_continues_identically() -> None:
    lengths = varied_lengths(500, seed=9)
    run = LengthGroupedBatchSampler(lengths, 4, seed=5)
    run.set_epoch(3)
    iterator = iter(run)
    seen = [next(iterator) for _ in range(17)]  # killed after 17 batches of epoch 3
    rest = list(iterator)
    resumed = LengthGroupedBatchSampler(lengths, 4, seed=5)
    resumed.set_epoch(3)
    assert list(itertools.islice(resumed, 17, None)) == rest
    assert seen + rest == list(resumed)  # iterating does not change the sampler's state


def test_padding_fraction_by_hand() -> None:
    assert padding_fraction([[0, 1], [2]], [2, 4, 3]) == pytest.approx(2 / 11)
    assert padding_fraction([], []) == 0.0

"""models/scorers.py and the prefix-shared collator: one row per pair gives the plain concatenated batch's
log-probs, gradients and losses.

The references that take prefix-shared batches are tested in test_reference.py.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_PAD, random_pairs, tiny_lm
from preftune.data.collate import collate_pairs, collate_prefix_shared
from preftune.data.records import TokenizedPair
from preftune.errors import PreftuneError
from preftune.logprobs import IGNORE_INDEX
from preftune.models.load import freeze
from preftune.models.scorers import (
    SequenceLogps,
    SharedPrefixLogps,
    shared_position_ids,
)

PAD = TINY_PAD


def test_layout_mask_positions_and_labels() -> None:
    pair = TokenizedPair(prompt_ids=[5, 6], chosen_ids=[7, 8, 9], rejected_ids=[10, 11], index=3)
    short = TokenizedPair(prompt_ids=[12], chosen_ids=[13], rejected_ids=[14], index=4)
    batch = collate_prefix_shared([pair, short], pad_token_id=PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 0, 0, 0, 0]]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 2, 3]  # rejected restarts after the prompt
    assert batch["position_ids"][1, :3].tolist() == [0, 1, 1]
    ign = IGNORE_INDEX
    assert batch["labels"].tolist() == [
        [ign, ign, 7, 8, 9, ign, ign],
        [ign, 13, ign, ign, ign, ign, ign],
        [ign, ign, ign, ign, ign, 10, 11],
        [ign, ign, 14, ign, ign, ign, ign],
    ]
    mask = batch["attention_mask"][0, 0].int().tolist()
    assert mask[4] == [1, 1, 1, 1, 1, 0, 0]  # last chosen: prompt and chosen
    assert mask[5] == [1, 1, 0, 0, 0, 1, 0]  # first rejected: the prompt and itself, no chosen
    assert mask[6] == [1, 1, 0, 0, 0, 1, 1]
    padding = batch["attention_mask"][1, 0].int()
    assert padding[3].tolist() == [0, 0, 0, 1, 0, 0, 0]  # padding sees only itself
    assert batch["real_tokens"].tolist() == [2 * 2 + 3 + 2, 2 * 1 + 1 + 1]
    assert batch["index"].tolist() == [3, 4]
    assert torch.equal(shared_position_ids(batch["labels"])[0], batch["position_ids"][0])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logps_and_gradients_equal_the_plain_path(attn: str) -> None:
    pairs = random_pairs(6, seed=1)
    lm = tiny_lm(attn)
    weights = torch.randn(12, generator=torch.Generator().manual_seed(0))

    def run(scorer: torch.nn.Module, batch: dict, with_positions: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
        lm.zero_grad(set_to_none=True)
        extra = (batch["position_ids"],) if with_positions else ()
        logps, tokens = scorer(batch["input_ids"], batch["attention_mask"], batch["labels"], *extra)
        (logps * weights).sum().backward()
        return logps.detach(), tokens, {n: p.grad.clone() for n, p in lm.named_parameters()}

    plain = run(SequenceLogps(lm, chunk_size=7), collate_pairs(pairs, PAD), False)
    shared_batch = collate_prefix_shared(pairs, PAD)
    for with_positions in (True, False):  # the loss and the references call it without positions
        shared = run(SharedPrefixLogps(lm, chunk_size=7), shared_batch, with_positions)
        assert torch.equal(shared[1], plain[1])
        torch.testing.assert_close(shared[0], plain[0], atol=1e-5, rtol=0)
        for name, grad in plain[2].items():
            torch.testing.assert_close(shared[2][name], grad, atol=1e-5, rtol=1e-5, msg=name)
    # the shared row really is shorter than the two plain rows together
    assert shared_batch["input_ids"].numel() < collate_pairs(pairs, PAD)["input_ids"].numel()


def test_the_first_rejected_token_is_predicted_from_the_prompt() -> None:
    # One pair whose only rejected token follows a long chosen part: predicting it from the last
    # chosen position (the naive shift) would give a different number.
    pair = TokenizedPair(prompt_ids=[3, 4], chosen_ids=[5, 6, 7, 8], rejected_ids=[9], index=0)
    lm = tiny_lm()
    with torch.no_grad():
        plain, _ = SequenceLogps(lm)(**_args(collate_pairs([pair], PAD)))
        shared, _ = SharedPrefixLogps(lm)(**_args(collate_prefix_shared([pair], PAD)))
        logits = lm(input_ids=torch.tensor([[3, 4, 9]])).logits
    by_hand = torch.log_softmax(logits[0, 1], dim=-1)[9]
    torch.testing.assert_close(shared[1], by_hand, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)


def _args(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def test_dpo_training_gives_the_plain_paths_losses() -> None:
    from preftune.config.schema import DPOConfig
    from preftune.stages.dpo import make_loss_fn
    from preftune.stages.lifecycle import count_weight
    from preftune.training.reference import FrozenCopyReference

    pairs = random_pairs(16, seed=2)
    batches = [pairs[i : i + 4] for i in range(0, 16, 4)]

    def train(scorer_cls: type, collate) -> list[float]:
        policy = tiny_lm(seed=3)
        reference = FrozenCopyReference(scorer_cls(freeze(tiny_lm(seed=3))))
        scorer = scorer_cls(policy, chunk_size=16)
        loss_fn = make_loss_fn(DPOConfig(), reference)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
        losses = []
        for step in range(6):
            batch = collate(batches[step % len(batches)], PAD)
            loss, metrics = loss_fn(scorer, batch, count_weight(batch))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses

    plain = train(SequenceLogps, collate_pairs)
    shared = train(SharedPrefixLogps, collate_prefix_shared)
    assert plain[0] == pytest.approx(0.693147, abs=1e-6)
    assert abs(plain[-1] - plain[0]) > 1e-2  # the policy moved, so the later steps test the gradients
    assert shared == pytest.approx(plain, abs=1e-5)


def test_wrong_batches_fail_loudly() -> None:
    lm = tiny_lm()
    pairs = random_pairs(3, seed=5)
    plain = collate_pairs(pairs, PAD)
    with pytest.raises(ValueError, match="collate_prefix_shared"):
        SharedPrefixLogps(lm)(plain["input_ids"], plain["attention_mask"], plain["labels"])
    shared = collate_prefix_shared(pairs, PAD)
    with pytest.raises((IndexError, RuntimeError, ValueError)):  # a shape mismatch, whichever way it surfaces
        SequenceLogps(lm)(shared["input_ids"], shared["attention_mask"], shared["labels"])
    with pytest.raises(PreftuneError, match="non-empty prompt"):
        collate_prefix_shared([TokenizedPair(prompt_ids=[], chosen_ids=[1], rejected_ids=[2], index=0)], PAD)
    flash = tiny_lm()
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(PreftuneError, match="4D mask"):
        SharedPrefixLogps(flash)(shared["input_ids"], shared["attention_mask"], shared["labels"])


def test_ld_dpo_and_wpo_sums_are_the_same_in_both_layouts() -> None:
    """LD-DPO's tail-weighted sums and WPO's aligned sums, prefix-shared and concatenated, against per-token values."""
    from preftune.logprobs import ld_token_weights, token_logps

    pairs = random_pairs(6, seed=4)
    lm = tiny_lm()
    plain_batch, shared_batch = collate_pairs(pairs, PAD), collate_prefix_shared(pairs, PAD)
    with torch.no_grad():
        plain = SequenceLogps(lm, chunk_size=5, ld_alpha=0.3, wpo=True)(plain_batch["input_ids"], plain_batch["attention_mask"],
                                                                        plain_batch["labels"])
        shared = SharedPrefixLogps(lm, chunk_size=5, ld_alpha=0.3, wpo=True)(shared_batch["input_ids"], shared_batch["attention_mask"],
                                                                             shared_batch["labels"])
        # by hand: per-token log-probs, the first min(|yw|, |yl|) of each side weighing 1 and the rest 0.3
        hidden = lm.model(input_ids=plain_batch["input_ids"], attention_mask=plain_batch["attention_mask"]).last_hidden_state
        per_token = token_logps(hidden, lm.lm_head.weight, plain_batch["labels"])
    scored = plain_batch["labels"][:, 1:] != IGNORE_INDEX
    lengths = scored.sum(1)
    expected = []
    for row in range(len(lengths)):
        pair = row % len(pairs)
        shared_len = int(min(lengths[pair], lengths[pair + len(pairs)]))
        values = per_token[row][scored[row]]
        expected.append(float(values[:shared_len].sum() + 0.3 * values[shared_len:].sum()))
    assert any(int(lengths[i]) != int(lengths[i + len(pairs)]) for i in range(len(pairs)))  # some tails exist
    torch.testing.assert_close(plain[0], torch.tensor(expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(shared[0], plain[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(shared[2], plain[2], atol=1e-5, rtol=0)
    weights = ld_token_weights(scored, 0.0)
    assert torch.equal(weights.sum(1)[: len(pairs)], torch.minimum(*lengths.chunk(2)).float())

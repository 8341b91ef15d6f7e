"""Chunked completion log-probs against the textbook full-logits computation (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.logprobs import (
    IGNORE_INDEX,
    completion_logps,
    completion_logps_with_stats,
    naive_completion_logps,
    token_logps,
)

ROWS, LENGTH, HIDDEN, VOCAB = 4, 9, 8, 13


def make_batch(seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (rows, length, hidden), weight (vocab, hidden), bias (vocab,), labels with -100 on
    the prompt and the right padding; row 2 has no scored token at all."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(ROWS, LENGTH, HIDDEN, generator=gen, dtype=dtype)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen, dtype=dtype)
    bias = torch.randn(VOCAB, generator=gen, dtype=dtype)
    labels = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=gen)
    # (prompt length, real length): completion is labels[prompt:real], the rest is prompt or padding
    for row, (prompt, real) in enumerate([(3, 9), (1, 6), (4, 4), (2, 5)]):
        labels[row, :prompt] = IGNORE_INDEX
        labels[row, real:] = IGNORE_INDEX
    return hidden, weight, bias, labels


def reference_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float = 1.0, cap: float | None = None
) -> torch.Tensor:
    """The full logits tensor as a model head builds it: scale, then Gemma-2 style soft-capping."""
    logits = hidden @ weight.t() + (0 if bias is None else bias)
    logits = logits * scale
    return logits if cap is None else cap * torch.tanh(logits / cap)


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def test_naive_reference_is_the_per_position_log_softmax() -> None:
    # the reference itself, checked position by position with plain floats
    hidden, weight, bias, labels = make_batch(0, torch.float64)
    logits = reference_logits(hidden, weight, bias)
    sums, counts = naive_completion_logps(logits, labels)
    for row in range(ROWS):
        total, n = 0.0, 0
        for t in range(LENGTH - 1):
            target = int(labels[row, t + 1])
            if target == IGNORE_INDEX:
                continue
            values = logits[row, t].tolist()
            top = max(values)
            total += values[target] - top - math.log(sum(math.exp(v - top) for v in values))
            n += 1
        assert sums[row].item() == pytest.approx(total, rel=1e-6, abs=1e-6)
        assert counts[row].item() == n
    assert counts.tolist() == [6, 5, 0, 3]


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
@pytest.mark.parametrize("with_bias", [True, False])
def test_chunked_equals_naive_values_and_gradients(chunk_size: int, with_bias: bool) -> None:
    hidden, weight, bias, labels = make_batch(chunk_size)
    h1, w1, b1 = leaves(hidden, weight, bias)
    h2, w2, b2 = leaves(hidden, weight, bias)
    sums, counts = completion_logps(h1, w1, labels, bias=b1 if with_bias else None, chunk_size=chunk_size)
    expected, expected_counts = naive_completion_logps(reference_logits(h2, w2, b2 if with_bias else None), labels)
    assert sums.dtype == torch.float32
    assert torch.allclose(sums, expected, atol=1e-5, rtol=1e-5)
    assert counts.tolist() == expected_counts.tolist() == [6, 5, 0, 3]
    assert sums[2].item() == 0.0  # nothing scored: 0, not NaN
    upstream = torch.tensor([0.7, -1.3, 2.0, 0.4])  # a non-uniform upstream gradient, as a loss gives
    (sums * upstream).sum().backward()
    (expected * upstream).sum().backward()
    assert torch.allclose(h1.grad, h2.grad, atol=1e-5, rtol=1e-5)
    assert torch.allclose(w1.grad, w2.grad, atol=1e-5, rtol=1e-5)
    if with_bias:
        assert torch.allclose(b1.grad, b2.grad, atol=1e-5, rtol=1e-5)
    else:
        assert b1.grad is None
    # positions that predict nothing (prompt, padding, the last one) get exactly zero gradient
    unscored = torch.ones(ROWS, LENGTH, dtype=torch.bool)
    unscored[:, :-1] = labels[:, 1:] == IGNORE_INDEX
    assert (h1.grad[unscored] == 0).all()


@pytest.mark.parametrize("scale, cap", [(0.25, None), (1.0, 3.0), (0.5, 2.0)])
def test_logit_scale_and_softcap_match_the_transformed_reference(scale: float, cap: float | None) -> None:
    hidden, weight, bias, labels = make_batch(7)
    hidden = hidden * 3  # large logits, so the soft cap actually bends them
    h1, w1, b1 = leaves(hidden, weight, bias)
    h2, w2, b2 = leaves(hidden, weight, bias)
    sums, _ = completion_logps(h1, w1, labels, bias=b1, chunk_size=4, logit_scale=scale, final_logit_softcap=cap)
    expected, _ = naive_completion_logps(reference_logits(h2, w2, b2, scale, cap), labels)
    assert torch.allclose(sums, expected, atol=1e-5, rtol=1e-5)
    plain, _ = naive_completion_logps(reference_logits(hidden, weight, bias), labels)
    assert not torch.allclose(sums, plain, atol=1e-2)  # the transform is not a no-op here
    sums.sum().backward()
    expected.sum().backward()
    for mine, theirs in ((h1, h2), (w1, w2), (b1, b2)):
        assert torch.allclose(mine.grad, theirs.grad, atol=1e-5, rtol=1e-5)


def test_no_scored_tokens_at_all() -> None:
    hidden, weight, _, labels = make_batch(3)
    hidden.requires_grad_()
    sums, counts = completion_logps(hidden, weight, torch.full_like(labels, IGNORE_INDEX), chunk_size=2)
    assert sums.tolist() == [0.0] * ROWS and counts.tolist() == [0] * ROWS
    sums.sum().backward()
    assert (hidden.grad == 0).all()


def test_gradcheck_float64() -> None:
    # The kernel computes logits in float32 by design (its output is documented as fp32), so
    # finite differences are limited by fp32 round-off (~1e-7 / eps): eps and tolerances are
    # loosened accordingly. A wrong backward (a missed term, a wrong chunk) is off by O(1).
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[-100, 1, 5, -100, -100], [-100, -100, 4, 0, 2]])

    def f(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return completion_logps(h, w, labels, bias=b, chunk_size=2, logit_scale=0.8, final_logit_softcap=2.5)[0]

    assert torch.autograd.gradcheck(f, (hidden, weight, bias), eps=1e-3, atol=2e-3, rtol=1e-3)


def test_token_logps_per_position() -> None:
    hidden, weight, bias, labels = make_batch(5)
    h1, w1 = leaves(hidden, weight)
    h2, w2 = leaves(hidden, weight)
    values = token_logps(h1, w1, labels, bias=bias, chunk_size=3)
    assert values.shape == (ROWS, LENGTH - 1)
    logp = torch.log_softmax(reference_logits(h2, w2, bias)[:, :-1], dim=-1)
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    expected = torch.where(scored, logp.gather(2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1), torch.zeros(()))
    assert torch.allclose(values, expected, atol=1e-5)
    assert (values[~scored] == 0).all()
    assert torch.allclose(values.sum(1), completion_logps(hidden, weight, labels, bias=bias)[0], atol=1e-5)
    values.sum().backward()
    expected.sum().backward()
    assert torch.allclose(h1.grad, h2.grad, atol=1e-5) and torch.allclose(w1.grad, w2.grad, atol=1e-5)


def test_bf16_autocast_on_cpu() -> None:
    hidden, weight, bias, labels = make_batch(11)
    h1, w1, b1 = leaves(hidden, weight, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sums, _ = completion_logps(h1, w1, labels, bias=b1, chunk_size=3)
    assert sums.dtype == torch.float32
    sums.sum().backward()
    expected, _ = naive_completion_logps(reference_logits(hidden, weight, bias), labels)
    # bf16 keeps 8 bits of mantissa: each logit is off by up to ~0.03, so sums of <= 6 tokens
    # (~ -30) are off by a few hundredths; seen 0.02-0.045 over seeds 11-15
    assert torch.allclose(sums, expected, atol=0.15, rtol=0.01)
    assert not torch.allclose(sums, expected, atol=1e-4)  # the head really ran in bf16, as the model's own would
    assert h1.grad.dtype == torch.float32 and w1.grad.dtype == torch.float32
    h2, w2, b2 = leaves(hidden, weight, bias)
    naive_completion_logps(reference_logits(h2, w2, b2), labels)[0].sum().backward()
    for mine, theirs in ((h1, h2), (w1, w2), (b1, b2)):
        assert torch.isfinite(mine.grad).all()
        assert torch.allclose(mine.grad, theirs.grad, atol=0.06, rtol=0.02)  # seen <= 0.02 on gradients of size ~4


def test_chunk_size_must_be_positive() -> None:
    hidden, weight, _, labels = make_batch(0)
    with pytest.raises(ValueError, match="chunk_size"):
        completion_logps(hidden, weight, labels, chunk_size=0)


def test_sequence_logps_on_a_real_tiny_llama() -> None:
    from preftune.models.scorers import SequenceLogps
    from preftune.models.tiny import (
        synthetic_corpus,
        synthetic_preferences,
        tiny_llama,
        train_tokenizer,
    )

    tokenizer = train_tokenizer(synthetic_corpus(), vocab_size=300)
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4)
    rows = []
    for record in synthetic_preferences(3, seed=4):
        prompt = tokenizer(record["prompt"])["input_ids"]
        for completion in (record["chosen"], record["rejected"]):
            ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append((prompt + ids, [IGNORE_INDEX] * len(prompt) + ids))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in rows])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    assert (attention_mask == 0).any()  # right padding is exercised

    sums, counts = SequenceLogps(model, chunk_size=7)(input_ids, attention_mask, labels)
    sums.sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    expected, expected_counts = naive_completion_logps(model(input_ids, attention_mask=attention_mask).logits, labels)
    assert torch.allclose(sums, expected, atol=1e-5, rtol=1e-5)
    assert counts.tolist() == expected_counts.tolist() == [len([x for x in lab if x != IGNORE_INDEX]) for _, lab in rows]
    expected.sum().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_entropy_and_top1_hits_match_the_full_logits(chunk_size: int) -> None:
    hidden, weight, bias, labels = make_batch(7)
    hidden.requires_grad_(True)
    logps, tokens, entropy, hits = completion_logps_with_stats(hidden, weight, labels, bias=bias, chunk_size=chunk_size)
    logits = reference_logits(hidden.detach(), weight, bias)[:, :-1]
    targets, scored = labels[:, 1:], labels[:, 1:] != IGNORE_INDEX
    log_p = torch.log_softmax(logits, dim=-1)
    want_entropy = (-(log_p.exp() * log_p).sum(-1) * scored).sum(1)  # by hand: -sum_v p_v log p_v, over completion tokens
    want_hits = ((logits.argmax(-1) == targets) & scored).sum(1).float()
    torch.testing.assert_close(entropy, want_entropy, atol=1e-5, rtol=1e-5)
    assert torch.equal(hits, want_hits) and entropy[2] == 0 and hits[2] == 0  # row 2 scores nothing
    plain = completion_logps(hidden, weight, labels, bias=bias, chunk_size=chunk_size)
    torch.testing.assert_close(logps, plain[0], atol=0, rtol=0)
    assert torch.equal(tokens, plain[1])
    (grad,) = torch.autograd.grad(logps.sum(), hidden)  # the statistics change no gradient
    (plain_grad,) = torch.autograd.grad(plain[0].sum(), hidden)
    torch.testing.assert_close(grad, plain_grad, atol=0, rtol=0)


def test_wpo_logps_are_each_tokens_log_prob_against_the_sum_of_squared_probs() -> None:
    from preftune.logprobs import wpo_logps

    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(3, 6, 8, generator=gen, dtype=torch.float64)
    weight = torch.randn(11, 8, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 6), generator=gen)
    labels[:, :2] = -100
    labels[1, 4:] = -100
    logits = hidden @ weight.T
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = labels[:, 1:]
    scored = targets != -100
    picked = logp.gather(2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = ((picked - torch.log((logp.exp() ** 2).sum(-1))) * scored).sum(1)
    for chunk in (1, 4, 1024):
        assert torch.allclose(wpo_logps(hidden, weight, labels, chunk_size=chunk).double(), expected, rtol=1e-5, atol=1e-5)

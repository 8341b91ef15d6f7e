"""Did alignment work, and what did it cost? Metrics of a policy against its reference.

- :func:`preference_metrics` on held-out pairs: DPO implicit rewards (accuracy, margins) and
  the alignment check: for how many pairs does the policy's log-ratio
  ``log p(chosen) - log p(rejected)`` exceed the reference's, and by how much (the
  distribution). With summed log-probs the implicit reward margin is exactly ``beta`` times
  that difference, so ``rewards/accuracies`` and ``alignment/improved`` agree by construction
  (up to float rounding): two views of one quantity, the second in nats and without ``beta``.
- :func:`perplexity` on held-out text: language quality not lost.
- :func:`kl_to_reference`: KL(policy || reference) estimated from policy samples.
- win rates by a judge: :mod:`preftune.eval.judges`.

:func:`preftune.eval.run.run_eval` ties them together from folders and files and writes
``eval.json``; :func:`preftune.report.html.format_table` renders it for a terminal.
Log-probs follow preftune's one convention: summed over completion tokens, EOS included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from preftune.data.records import TokenizedPair
from preftune.errors import PreftuneError
from preftune.eval.generate import Generated, GenerationSettings, generate_ids
from preftune.eval.prompts import Prompt
from preftune.stats import quantiles

#: quantiles of the per-pair log-ratio differences reported by :func:`preference_metrics`
QUANTILES = (5, 25, 50, 75, 95)


@torch.no_grad()
def sequence_logps(
    model: nn.Module,
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_token_id: int,
    *,
    batch_size: int = 16,
    chunk_size: int = 1024,
) -> tuple[list[float], list[int]]:
    """For each ``(context_ids, target_ids)`` row: the summed log-prob of the targets given the
    context (teacher forcing) and the number of targets. Rows are batched by length.

    Per-token log-probs are summed with a plain reduction rather than ``SequenceLogps``'
    ``index_add``, whose atomic adds on CUDA make two passes over the same input differ in the
    last bits: here a model scored twice gives the same numbers, so a policy that is its
    reference shows exactly zero change on a GPU as on a CPU.
    """
    from preftune.data.collate import collate_unpaired
    from preftune.data.records import TokenizedUnpaired
    from preftune.logprobs import IGNORE_INDEX, token_logps
    from preftune.models.scorers import body_of, causal_lm_of

    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    lm = causal_lm_of(model)
    head = lm.get_output_embeddings()
    scale = float(getattr(lm.config, "logit_scale", None) or 1.0)  # as SequenceLogps reads the head's config
    cap = getattr(lm.config, "final_logit_softcapping", None)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logps, tokens = [0.0] * len(rows), [0] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    try:
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            items = [TokenizedUnpaired(list(rows[i][0]), list(rows[i][1]), True) for i in index]
            batch = collate_unpaired(items, pad_token_id)
            labels = batch["labels"].to(device)
            hidden = body_of(lm)(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                                 use_cache=False).last_hidden_state
            per_token = token_logps(hidden, head.weight, labels, bias=getattr(head, "bias", None), chunk_size=chunk_size,
                                    logit_scale=scale, final_logit_softcap=cap)
            sums, counts = per_token.sum(dim=1), (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
            for i, value, count in zip(index, sums.tolist(), counts.tolist()):
                logps[i], tokens[i] = value, count
    finally:
        model.train(was_training)
    return logps, tokens


def preference_metrics(
    policy_model: nn.Module,
    reference_model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[TokenizedPair],
    *,
    beta: float,
    batch_size: int = 16,
    chunk_size: int = 1024,
) -> dict[str, Any]:
    """Implicit rewards and the alignment check on tokenized held-out pairs (unweighted means).

    Keys: ``pairs``, ``beta``; ``rewards/chosen``, ``rewards/rejected`` (``beta * (log pi - log
    ref)``), ``rewards/margins``, ``rewards/accuracies`` (margin > 0); ``logps/chosen``,
    ``logps/rejected`` of the policy and ``reference/logps/...``; ``logratio/policy_accuracy``
    and ``logratio/reference_accuracy`` (each model alone prefers chosen); ``alignment/improved``
    (policy log-ratio > reference log-ratio), ``alignment/unchanged`` (equal), ``alignment/mean``,
    ``alignment/quantiles`` and ``alignment/differences`` (per pair, nats); ``perplexity/chosen``
    and ``reference/perplexity/chosen`` (token-weighted, over the chosen completions).
    """
    if not pairs:
        raise PreftuneError("no held-out pairs to evaluate.")
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    pad = tokenizer.pad_token_id
    policy, tokens = sequence_logps(policy_model, rows, pad, batch_size=batch_size, chunk_size=chunk_size)
    reference, _ = sequence_logps(reference_model, rows, pad, batch_size=batch_size, chunk_size=chunk_size)
    n = len(pairs)
    pc, pr, rc, rr = policy[:n], policy[n:], reference[:n], reference[n:]
    chosen_rewards = [beta * (a - b) for a, b in zip(pc, rc)]
    rejected_rewards = [beta * (a - b) for a, b in zip(pr, rr)]
    margins = [c - r for c, r in zip(chosen_rewards, rejected_rewards)]
    policy_ratio = [a - b for a, b in zip(pc, pr)]
    reference_ratio = [a - b for a, b in zip(rc, rr)]
    differences = [a - b for a, b in zip(policy_ratio, reference_ratio)]
    chosen_tokens = sum(tokens[:n])
    return {
        "pairs": n,
        "beta": beta,
        "rewards/chosen": _mean(chosen_rewards),
        "rewards/rejected": _mean(rejected_rewards),
        "rewards/margins": _mean(margins),
        "rewards/accuracies": _mean([m > 0 for m in margins]),
        "logps/chosen": _mean(pc),
        "logps/rejected": _mean(pr),
        "reference/logps/chosen": _mean(rc),
        "reference/logps/rejected": _mean(rr),
        "logratio/policy_accuracy": _mean([r > 0 for r in policy_ratio]),
        "logratio/reference_accuracy": _mean([r > 0 for r in reference_ratio]),
        "alignment/improved": _mean([d > 0 for d in differences]),
        "alignment/unchanged": _mean([d == 0 for d in differences]),
        "alignment/mean": _mean(differences),
        "alignment/quantiles": quantiles(differences, QUANTILES, bounds=("min", "max")) if differences else {},
        "alignment/differences": differences,
        "perplexity/chosen": math.exp(-sum(pc) / max(1, chosen_tokens)),
        "reference/perplexity/chosen": math.exp(-sum(rc) / max(1, chosen_tokens)),
    }


def perplexity_details(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 16, max_length: int = 1024, chunk_size: int = 1024
) -> dict[str, Any]:
    """Token-weighted perplexity ``exp(-sum log p / tokens)`` over ``texts``, with its counts.

    Each text is encoded as a prompt is (the tokenizer's BOS in front, no EOS added) and cut to
    ``max_length`` tokens (``truncated`` counts those). The first token is never scored: it has
    no context (it is BOS when the tokenizer adds one). Texts of a single token are ``skipped``.
    """
    from preftune.data.tokenize import encode_prompt

    if max_length < 2:
        raise PreftuneError("perplexity needs max_length >= 2.")
    encoded = [encode_prompt(tokenizer, text) for text in texts]
    truncated = sum(len(ids) > max_length for ids in encoded)
    rows = [(ids[:1], ids[1:max_length]) for ids in encoded if len(ids) >= 2]
    if not rows:
        raise PreftuneError("perplexity: no text has a token to score.")
    logps, tokens = sequence_logps(model, rows, tokenizer.pad_token_id, batch_size=batch_size, chunk_size=chunk_size)
    total = sum(tokens)
    return {"perplexity": math.exp(-sum(logps) / total), "texts": len(rows), "tokens": total,
            "truncated": truncated, "skipped": len(encoded) - len(rows)}


def perplexity(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 16, max_length: int = 1024
) -> float:
    """Token-weighted perplexity of ``model`` on ``texts`` (BOS not scored; see :func:`perplexity_details`)."""
    return perplexity_details(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)["perplexity"]


def kl_to_reference(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    system: str | Sequence[str | None] | None = None,
    num_samples: int = 4,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 16,
    chunk_size: int = 1024,
) -> dict[str, Any]:
    """KL(policy || reference) over completions of ``prompts``, estimated from policy samples.

    ``num_samples`` completions per prompt are drawn from the policy at temperature 1 with no
    filter (no top-k/top-p), so they follow the policy's own distribution and
    ``log pi(y|x) - log ref(y|x)`` summed over the sampled tokens (EOS included) is an unbiased
    estimate of the sequence-level KL, per sample. Returns :func:`kl_from_samples`'s dict.
    Completions cut at ``max_new_tokens`` estimate the KL of that prefix distribution.
    """
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=1.0, do_sample=True,
                                  num_samples=num_samples, seed=seed, batch_size=batch_size)
    samples = generate_ids(policy, tokenizer, prompts, settings, system=system)
    return kl_from_samples(policy, reference, tokenizer, samples, batch_size=batch_size, chunk_size=chunk_size)


def kl_from_samples(
    policy: nn.Module, reference: nn.Module, tokenizer: Any, samples: Generated, *, batch_size: int = 16, chunk_size: int = 1024
) -> dict[str, Any]:
    """The KL estimate from policy samples already drawn at temperature 1 (see :func:`kl_to_reference`).

    Both models score the same token ids with teacher forcing. Returns ``mean``, ``stderr``
    (sample standard deviation / sqrt(n); None for one sample), ``n``, ``per_sample``,
    ``mean_tokens``, ``finished`` (share that ended with EOS), ``logps_policy`` and
    ``logps_reference`` (mean summed log-probs of the samples).
    """
    rows = [(samples.prompt_ids[i], ids) for i, group in enumerate(samples.completion_ids) for ids in group]
    if not rows:
        raise PreftuneError("KL estimate: no samples.")
    pad = tokenizer.pad_token_id
    policy_logps, tokens = sequence_logps(policy, rows, pad, batch_size=batch_size, chunk_size=chunk_size)
    reference_logps, _ = sequence_logps(reference, rows, pad, batch_size=batch_size, chunk_size=chunk_size)
    per_sample = [a - b for a, b in zip(policy_logps, reference_logps)]
    n = len(per_sample)
    mean = _mean(per_sample)
    stderr = math.sqrt(sum((x - mean) ** 2 for x in per_sample) / (n - 1) / n) if n > 1 else None
    finished = [samples.finished(i, j) for i, group in enumerate(samples.completion_ids) for j in range(len(group))]
    return {"mean": mean, "stderr": stderr, "n": n, "per_sample": per_sample, "mean_tokens": _mean(tokens),
            "finished": _mean(finished), "logps_policy": _mean(policy_logps), "logps_reference": _mean(reference_logps)}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# --------------------------------------------------------------------------- from folders and files

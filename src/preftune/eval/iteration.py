"""One round of `preftune iterate` measured on held-out prompts: the judge's score of the policy's
samples, its win rate against the initial model, and its KL to the initial model.

Samples are drawn at temperature 1 with no filter (so the KL estimate is unbiased, see
:func:`~preftune.eval.metrics.kl_to_reference`), ``eval_samples`` per prompt, with one fixed
seed for every round's policy and another for the initial model's samples, which are drawn once
and kept (``initial.json``), so every round is compared with the same initial completions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from preftune.eval.generate import GenerationSettings, decode, generate_ids
from preftune.eval.judges import Judge, win_rate
from preftune.eval.metrics import kl_from_samples
from preftune.eval.scoring import score_all

#: the seeds of held-out samples: the round's policy, and the initial model (independent draws)
POLICY_SEED_OFFSET = 1000
INITIAL_SEED_OFFSET = 1001


def eval_settings(max_new_tokens: int, samples: int, seed: int, batch_size: int) -> GenerationSettings:
    """Temperature 1, no filter: samples from the model's own distribution."""
    return GenerationSettings(max_new_tokens=max_new_tokens, temperature=1.0, do_sample=True, num_samples=samples,
                              seed=seed, batch_size=batch_size, progress=False)


def sample_and_score(model: Any, tokenizer: Any, prompts: Sequence[Any], systems: Sequence[str | None], judge: Judge,
                     settings: GenerationSettings) -> tuple[Any, list[list[str]], list[list[float]]]:
    """(generated ids, texts per prompt, judge scores per prompt)."""
    generated = generate_ids(model, tokenizer, list(prompts), settings, system=list(systems))
    texts = [[decode(tokenizer, ids, generated.stop_ids) for ids in group] for group in generated.completion_ids]
    return generated, texts, score_all(judge, list(prompts), texts)


def score_summary(scores: list[list[float]]) -> dict[str, float | int | None]:
    """Mean, standard error and count of every score."""
    flat = [v for group in scores for v in group]
    n = len(flat)
    mean = sum(flat) / n if n else float("nan")
    stderr = math.sqrt(sum((v - mean) ** 2 for v in flat) / (n - 1) / n) if n > 1 else None
    return {"mean": mean, "stderr": stderr, "n": n}


def initial_samples(model: Any, tokenizer: Any, prompts: Sequence[Any], systems: Sequence[str | None], judge: Judge, *,
                    max_new_tokens: int, samples: int, seed: int, batch_size: int) -> dict[str, Any]:
    """The initial model's held-out samples and their scores (``initial.json``)."""
    settings = eval_settings(max_new_tokens, samples, seed + INITIAL_SEED_OFFSET, batch_size)
    _, texts, scores = sample_and_score(model, tokenizer, prompts, systems, judge, settings)
    return {"judge": judge.name, "judge_score": score_summary(scores), "texts": texts, "scores": scores}


def evaluate_round(policy: Any, initial: Any, tokenizer: Any, prompts: Sequence[Any], systems: Sequence[str | None],
                   judge: Judge, initial_result: dict[str, Any], *, max_new_tokens: int, samples: int, seed: int,
                   batch_size: int) -> dict[str, Any]:
    """Judge score, win rate against the initial model's samples, and KL(policy || initial)."""
    settings = eval_settings(max_new_tokens, samples, seed + POLICY_SEED_OFFSET, batch_size)
    generated, texts, scores = sample_and_score(policy, tokenizer, prompts, systems, judge, settings)
    flat_prompts = [p for p in prompts for _ in range(samples)]
    flat_texts = [t for group in texts for t in group]
    flat_initial = [t for group in initial_result["texts"] for t in group]
    wins = win_rate(flat_prompts, flat_texts, flat_initial, judge)
    kl = kl_from_samples(policy, initial, tokenizer, generated, batch_size=batch_size)
    return {
        "judge_score": score_summary(scores),
        "win_rate_vs_initial": {k: wins[k] for k in ("win_rate", "wins", "losses", "ties", "n", "ci95")},
        "kl_to_initial": {k: kl[k] for k in ("mean", "stderr", "n", "mean_tokens", "finished")},
        "samples": [{"prompt": p, "policy": t[0], "initial": i[0]} for p, t, i in list(zip(prompts, texts, initial_result["texts"]))[:5]],
    }

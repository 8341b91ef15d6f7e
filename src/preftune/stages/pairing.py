"""Preference pairs from scored samples: what `preftune iterate` trains each round on.

For every prompt the policy drew K completions and a judge scored each one. Two rules make pairs:

- ``best_worst`` (the default): one pair per prompt, the highest-scored completion chosen and the
  lowest rejected (the first of each among equal scores), kept when the two scores differ by more
  than ``min_gap``;
- ``gap``: every two completions of a prompt whose scores differ by more than ``min_gap``, the
  higher one chosen.

Equal scores never make a pair: they are dropped and counted (``ties``), as are prompts with a
single completion (``single``) and prompts whose completions all score the same
(``all_equal``); ``below_gap`` counts candidate pairs whose scores differ, but by no more than
``min_gap``. Nothing is dropped without being counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from preftune.errors import ConfigError

RULES = ("best_worst", "gap")


@dataclass
class PairCounts:
    """What pairing made and what it left out (see the module docstring)."""

    prompts: int = 0
    pairs: int = 0
    ties: int = 0  # candidate pairs with equal scores
    below_gap: int = 0  # candidate pairs whose scores differ by no more than min_gap
    single: int = 0  # prompts with one completion: nothing to compare
    all_equal: int = 0  # prompts whose completions all score the same
    prompts_paired: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def build_pairs(prompts: Sequence[Any], completions: Sequence[Sequence[str]], scores: Sequence[Sequence[float]], *,
                rule: str = "best_worst", min_gap: float = 0.0,
                systems: Sequence[str | None] | None = None) -> tuple[list[dict[str, Any]], PairCounts]:
    """Preference records (``prompt``, ``chosen``, ``rejected``, the two scores, ``system`` when
    given) and the counts; item i of each list belongs to prompt i."""
    if rule not in RULES:
        raise ConfigError(f"pairing rule '{rule}' is not known (known: {', '.join(RULES)}).")
    if not (math.isfinite(min_gap) and min_gap >= 0):
        raise ConfigError(f"min_gap must be a finite number >= 0, got {min_gap!r}.")
    if not len(prompts) == len(completions) == len(scores):
        raise ValueError(f"{len(prompts)} prompts, {len(completions)} completion lists, {len(scores)} score lists")
    counts = PairCounts(prompts=len(prompts))
    records: list[dict[str, Any]] = []
    for i, (prompt, texts, values) in enumerate(zip(prompts, completions, scores)):
        if len(texts) != len(values):
            raise ValueError(f"prompt {i}: {len(texts)} completions but {len(values)} scores")
        if len(texts) < 2:
            counts.single += 1
            continue
        if len(set(values)) == 1:
            counts.all_equal += 1
            counts.ties += len(texts) * (len(texts) - 1) // 2 if rule == "gap" else 1
            continue
        candidates = _candidates(values, rule)
        made = 0
        for high, low in candidates:
            gap = values[high] - values[low]
            if gap == 0:
                counts.ties += 1
            elif gap <= min_gap:
                counts.below_gap += 1
            else:
                record = {"prompt": prompt, "chosen": texts[high], "rejected": texts[low],
                          "score_chosen": values[high], "score_rejected": values[low]}
                if systems is not None and systems[i] is not None:
                    record["system"] = systems[i]
                records.append(record)
                made += 1
        counts.pairs += made
        counts.prompts_paired += made > 0
    return records, counts


def _candidates(values: Sequence[float], rule: str) -> list[tuple[int, int]]:
    """(higher, lower) index pairs to consider, by the rule."""
    if rule == "best_worst":
        return [(values.index(max(values)), values.index(min(values)))]
    out = []
    for a in range(len(values)):
        for b in range(a + 1, len(values)):
            out.append((a, b) if values[a] >= values[b] else (b, a))
    return out

"""The one quantile definition, shared by the data report (token lengths) and evaluation, and the
one interval of a proportion (Wilson's), shared by the judges' win rates and the reports' accuracies,
and the normal 95% interval of a mean (from values, or from a standard error). Torch-free, on the
ground floor: data/, eval/ and report/ all compute with it.

Nearest rank: the q-quantile is the smallest value with at least ``q`` of the values at or
below it, so every reported quantile is a value that occurs (a real length, a real pair's
log-ratio difference), and integers stay integers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

Number = TypeVar("Number", int, float)


def nearest_rank(ordered: Sequence[Number], q: float) -> Number:
    """The nearest-rank ``q``-quantile (0 <= q <= 1) of ``ordered`` (sorted, not empty)."""
    if not ordered:
        raise ValueError("no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    rank = -(-round(q * 100 * len(ordered)) // 100)  # ceil(q * n), exact for whole percents
    return ordered[max(0, rank - 1)]


def quantiles(values: Sequence[Number], percents: Sequence[int], *, bounds: tuple[str, ...] = ("max",)) -> dict[str, Number]:
    """``{"p50": ..., ...}`` for whole ``percents``, plus ``min`` and/or ``max`` as ``bounds`` asks."""
    ordered = sorted(values)
    out = {f"p{p}": nearest_rank(ordered, p / 100) for p in percents}
    if "min" in bounds:
        out["min"] = ordered[0]
    if "max" in bounds:
        out["max"] = ordered[-1]
    return out


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion (Wilson 1927); ``successes`` may be fractional."""
    if n <= 0:
        raise ValueError("the Wilson interval needs n >= 1")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


#: the standard normal quantile of a two-sided 95% interval
Z95 = 1.959964


def mean_interval(values: Sequence[float]) -> tuple[float, tuple[float, float] | None]:
    """The mean of ``values`` and its 95% normal interval (None for fewer than two values)."""
    n = len(values)
    if n == 0:
        return float("nan"), None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    half = Z95 * math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    return mean, (mean - half, mean + half)


def stderr_interval(mean: float | None, stderr: float | None) -> tuple[float, float] | None:
    """The 95% normal interval of a mean from its standard error (None without one)."""
    if mean is None or stderr is None or math.isnan(mean) or math.isnan(stderr):
        return None
    return mean - Z95 * stderr, mean + Z95 * stderr

"""How a number, an interval, a prompt or a list of things is written in a report, once for every page.

- :func:`number`: 4 significant digits (``0.1235``), tiny values in scientific notation, ``n/a``
  for None and NaN, integers as they are;
- :func:`percent` and :func:`share_interval`: a share as ``87.6%``, and with its 95% interval
  as ``87.6% [84, 90]`` (the bounds in whole percent; one decimal when they are within 2 points);
- :func:`value_interval`: any other quantity with its interval, ``0.412 [0.301, 0.523]``;
- :func:`prompt_text`: a prompt as a person reads it: plain text as is, a conversation (a list
  of ``{"role", "content"}`` messages) one ``role: content`` line per message, never a dict literal;
- :func:`listing`: ``name value`` items joined into one sentence part (``sft 4.9 s, dpo 12.0 s``).

Nothing here knows about runs; :mod:`preftune.report.html` and :mod:`preftune.report.series`
write their tables with it, and the terminal tables read the same. The intervals themselves are
computed in :mod:`preftune.stats`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

#: z for a two-sided 95% normal interval

#: a cell that reads as a number (a sign, digits, maybe a percent and a bracketed interval): right-aligned in tables
_NUMERIC = re.compile(r"^-$|^[-+−]?(\d[\d,]*(\.\d+)?(e[-+]?\d+)?%?|n/a)(\s*(±\s*\S+|\[[^\]]*\]))*(\s*\([^)]*\))?$")


def number(value: Any) -> str:
    """A value for a table cell: floats to 4 significant digits, ``n/a`` for None and NaN."""
    if value is None:
        return "n/a"
    if isinstance(value, int):  # bool too
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def percent(value: float | None) -> str:
    """A share in [0, 1] as ``87.6%``; ``n/a`` for None and NaN."""
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def share_interval(value: float | None, interval: Sequence[float] | None) -> str:
    """A share and its interval: ``87.6% [84, 90]``; the bounds get one decimal when whole percents would blur them."""
    if value is None or not interval or math.isnan(value):
        return percent(value)
    low, high = (100 * bound for bound in interval)
    digits = 1 if high - low < 2 else 0
    return f"{percent(value)} [{low:.{digits}f}, {high:.{digits}f}]"


def value_interval(value: float | None, interval: Sequence[float] | None) -> str:
    """A quantity and its interval: ``0.412 [0.301, 0.523]``."""
    if value is None or not interval or math.isnan(value):
        return number(value)
    return f"{number(value)} [{number(interval[0])}, {number(interval[1])}]"


def prompt_text(prompt: Any) -> str:
    """A prompt as text: a string as is, a conversation as ``role: content`` lines, None as empty."""
    if prompt is None:
        return ""
    if isinstance(prompt, list):
        lines = []
        for message in prompt:
            if isinstance(message, dict):
                lines.append(f"{message.get('role', '?')}: {message.get('content', '')}")
            else:
                lines.append(str(message))
        return "\n".join(lines)
    return str(prompt)


def listing(items: Iterable[tuple[str, Any]], unit: str = "") -> str:
    """``[("sft", 4.9), ("dpo", 12)]`` -> ``sft 4.9 s, dpo 12`` (with ``unit=" s"``): a sentence part, not a literal."""
    return ", ".join(f"{name} {number(value)}{unit}" for name, value in items)


def is_numeric(cell: str) -> bool:
    """Whether a table cell reads as a number (with an interval or a note in brackets), or is a lone ``-`` (none):
    such cells align right."""
    return bool(_NUMERIC.match(cell.strip()))

"""Absolute scores of completions, for `preftune iterate`: a judge that rates one completion.

Where :mod:`preftune.eval.judges` compares two responses, iterating needs a score per sample
(to pick the best and the worst of K). Two kinds, as for win rates:

- a Python function named ``"module:function"`` or ``"file.py:function"`` (or, from
  :func:`preftune.iterate`, the function itself) taking ``(prompt, completion)`` and returning a
  real number (higher is better);
- a reward model folder (`preftune rm`'s ``final/``): its reward.

Either is returned as a :class:`~preftune.eval.judges.Judge` with a ``score`` function, so
:func:`~preftune.eval.judges.win_rate` compares two models by it (the higher score wins).
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Callable
from typing import Any

from preftune.errors import ConfigError, PreftuneError
from preftune.eval.judges import Judge, _load_function, accepting, reward_model_judge


def function_name(fn: Callable[..., Any]) -> str:
    """How a judge given as a Python function is named in messages and in the recorded config."""
    return f"{getattr(fn, '__module__', None) or '?'}:{getattr(fn, '__qualname__', None) or type(fn).__name__}"


def function_fingerprint(fn: Callable[..., Any]) -> str:
    """What identifies a judge function beyond its name: a sha256 of its code (bytecode, constants,
    names), its defaults and its closure's values, so two closures of one factory, or two lambdas,
    differ. Values are compared by their text when they are plain (numbers, strings, tuples of
    them, functions by their code), by their type otherwise: a closure's list of calls may grow."""

    def text(value: Any) -> str:
        if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
            return repr(value)
        if isinstance(value, (tuple, frozenset)):
            return f"{type(value).__name__}({[text(v) for v in value]})"
        if hasattr(value, "co_code"):  # a function's code, nested functions' included
            return f"code({value.co_code.hex()},{[text(c) for c in value.co_consts]},{value.co_names})"
        if hasattr(value, "__code__"):
            return f"{function_name(value)}:{text(value.__code__)}"
        return f"<{type(value).__module__}.{type(value).__qualname__}>"

    cells = [text(cell.cell_contents) for cell in (getattr(fn, "__closure__", None) or ())]
    parts = [function_name(fn), text(getattr(fn, "__code__", None)), text(getattr(fn, "__defaults__", None)),
             text(tuple(sorted((getattr(fn, "__kwdefaults__", None) or {}).items()))), *cells]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def function_scorer(spec: str | Callable[..., Any]) -> Judge:
    """A scoring judge from ``"module:function"`` / ``"file.py:function"``, or the function itself:
    ``fn(prompt, completion) -> float``."""
    if callable(spec):
        fn, spec = accepting(spec, function_name(spec), ("prompt", "completion")), function_name(spec)
    else:
        fn = _load_function(spec, ("prompt", "completion"))

    def score(prompts: list[Any], responses: list[str]) -> list[float]:
        values = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            try:
                value = fn(prompt, response)
            except Exception as err:  # the user's code: say whose it is and where it failed
                raise PreftuneError(f"judge '{spec}' raised {type(err).__name__} on completion {i}: {err}") from err
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
                raise PreftuneError(f"judge '{spec}' returned {value!r} on completion {i}; a scoring judge returns a finite "
                                    "number (higher is better).")
            values.append(float(value))
        return values

    return Judge(name=f"function {spec}", score=score)


def load_scorer(judge: str | Callable[..., Any] | None, reward_model: str | None, *, batch_size: int = 16, device: Any = None) -> Judge:
    """The one scoring judge the settings name: a function (``judge``: named, or itself) or a reward model folder."""
    if bool(judge) == bool(reward_model):
        raise ConfigError("iterate: name exactly one judge: iterate.judge (module:function, scoring (prompt, completion)) "
                          "or iterate.reward_model (a reward model folder).")
    if judge:
        return function_scorer(judge)
    return reward_model_judge(reward_model, batch_size=batch_size, device=device)


def score_all(judge: Judge, prompts: list[Any], completions: list[list[str]]) -> list[list[float]]:
    """Scores shaped as ``completions`` (item i: the completions of ``prompts[i]``)."""
    flat_prompts = [p for p, group in zip(prompts, completions) for _ in group]
    flat = judge.score(flat_prompts, [c for group in completions for c in group])
    if len(flat) != len(flat_prompts):
        raise PreftuneError(f"judge {judge.name} gave {len(flat)} scores for {len(flat_prompts)} completions.")
    out, k = [], 0
    for group in completions:
        out.append([float(v) for v in flat[k : k + len(group)]])
        k += len(group)
    return out

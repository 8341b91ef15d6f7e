"""Judges of policy samples against reference samples, and the win rate with its interval.

A judge sees ``(prompt, policy_response, reference_response)`` and gives the policy's score:
1 (policy wins), 0 (reference wins), 0.5 (tie), or a probability in between. Two kinds:

- :func:`function_judge`: any Python function, named ``"module:function"`` (an importable
  module) or ``"path/to/file.py:function"``;
- :func:`reward_model_judge`: a reward model trained by `preftune rm`; the higher reward wins,
  equal rewards tie, and the mean rewards of both sides are reported too.

:func:`win_rate` averages the scores (ties count as half a win) and gives a 95% Wilson score
interval. Treating each score as a Bernoulli draw makes that interval conservative when there
are ties or fractional scores: a score in [0, 1] with mean p has variance at most p(1 - p).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import numbers
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError
from preftune.stats import mean_interval, wilson_interval

#: (prompts, policy responses, reference responses) -> the policy's scores in [0, 1]
CompareFn = Callable[[list[Any], list[str], list[str]], list[float]]
#: (prompts, responses) -> rewards (higher is better)
ScoreFn = Callable[[list[Any], list[str]], list[float]]


@dataclass
class Judge:
    """A named judge: pairwise (``compare``) or by absolute rewards (``score``); exactly one is set."""

    name: str
    compare: CompareFn | None = None
    score: ScoreFn | None = None


def function_judge(spec: str) -> Judge:
    """A judge from ``"module:function"`` or ``"file.py:function"``; the function takes
    ``(prompt, policy_response, reference_response)`` and returns 1/0/0.5, a bool, or a float in [0, 1]."""
    fn = _load_function(spec)

    def compare(prompts: list[Any], policy: list[str], reference: list[str]) -> list[float]:
        scores = []
        for i, (prompt, a, b) in enumerate(zip(prompts, policy, reference)):
            try:
                value = fn(prompt, a, b)
            except Exception as err:  # the user's code: say whose it is and where it failed
                raise PreftuneError(f"judge '{spec}' raised {type(err).__name__} on comparison {i}: {err}") from err
            scores.append(_as_score(value, spec, i))
        return scores

    return Judge(name=f"function {spec}", compare=compare)


def reward_model_judge(path: str | Path, *, batch_size: int = 16, device: Any = None) -> Judge:
    """A judge from a reward model folder (`preftune rm`'s ``final/``): the higher reward wins."""
    from preftune.models.reward import load_reward_model, score_responses

    model, tokenizer = load_reward_model(path, device=device)

    def score(prompts: list[Any], responses: list[str]) -> list[float]:
        return list(score_responses(model, tokenizer, prompts, responses, batch_size=batch_size))

    return Judge(name=f"reward model {path}", score=score)


def as_judge(judge: Judge | Callable[[Any, str, str], Any]) -> Judge:
    """A :class:`Judge` as is, or a plain per-comparison function wrapped as one."""
    if isinstance(judge, Judge):
        return judge
    if not callable(judge):
        raise PreftuneError(f"a judge must be a Judge or a function, got {type(judge).__name__}")
    name = getattr(judge, "__qualname__", repr(judge))
    return Judge(name=f"function {name}", compare=lambda p, a, b: [_as_score(judge(*x), name, i) for i, x in enumerate(zip(p, a, b))])


def win_rate(
    prompts: Sequence[Any],
    policy_responses: Sequence[str],
    reference_responses: Sequence[str],
    judge: Judge | Callable[[Any, str, str], Any],
) -> dict[str, Any]:
    """The policy's win rate against the reference on aligned lists (item i: the same prompt).

    Returns ``win_rate`` (mean score; a tie is half a win), ``wins``/``losses``/``ties``
    (score above, below, at 0.5), ``n``, ``ci95`` (Wilson score interval, see the module
    docstring), ``mean_len_policy``/``mean_len_reference`` (characters), ``longer_wins`` (among
    decided comparisons of responses of different lengths, the share the longer one won: a
    length-bias check), and for reward-model judges ``reward_policy``/``reward_reference`` (mean rewards) and
    ``reward_policy_ci95`` (the 95% normal interval of the policy's mean reward).
    """
    judge = as_judge(judge)
    prompts, policy, reference = list(prompts), list(policy_responses), list(reference_responses)
    if not len(prompts) == len(policy) == len(reference):
        raise ValueError(f"{len(prompts)} prompts, {len(policy)} policy and {len(reference)} reference responses")
    if not prompts:
        raise PreftuneError("win rate: no comparisons to judge.")
    extra: dict[str, Any] = {}
    if judge.score is not None:
        rewards_policy = [float(r) for r in judge.score(prompts, policy)]
        rewards_reference = [float(r) for r in judge.score(prompts, reference)]
        scores = [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(rewards_policy, rewards_reference)]
        extra = {"reward_policy": _mean(rewards_policy), "reward_reference": _mean(rewards_reference),
                 "reward_policy_ci95": list(mean_interval(rewards_policy)[1] or ()) or None}
    elif judge.compare is not None:
        scores = [float(s) for s in judge.compare(prompts, policy, reference)]
        if len(scores) != len(prompts):
            raise PreftuneError(f"judge {judge.name} gave {len(scores)} scores for {len(prompts)} comparisons.")
    else:
        raise PreftuneError(f"judge {judge.name} has neither a compare nor a score function.")
    n = len(scores)
    total = sum(scores)
    low, high = wilson_interval(total, n)
    decided = [(s, len(a), len(b)) for s, a, b in zip(scores, policy, reference) if s != 0.5 and len(a) != len(b)]
    longer = [(s > 0.5) == (la > lb) for s, la, lb in decided]
    return {
        "judge": judge.name,
        "win_rate": total / n,
        "wins": sum(s > 0.5 for s in scores),
        "losses": sum(s < 0.5 for s in scores),
        "ties": sum(s == 0.5 for s in scores),
        "n": n,
        "ci95": [low, high],
        "interval": "wilson",
        "mean_len_policy": _mean([len(r) for r in policy]),
        "mean_len_reference": _mean([len(r) for r in reference]),
        "longer_wins": _mean(longer) if longer else None,
        **extra,
        "scores": scores,
    }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _as_score(value: Any, spec: str, i: int) -> float:
    """bool -> 1/0; a real number in [0, 1] as is; anything else is the user's error."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, numbers.Real) and 0.0 <= float(value) <= 1.0:  # NaN fails both comparisons
        return float(value)
    raise PreftuneError(
        f"judge '{spec}' returned {value!r} on comparison {i}; a judge returns 1 (policy wins), 0 (reference wins), "
        "0.5 (tie), a bool, or a probability in [0, 1] that the policy's response is better."
    )


_COUNT = {1: "one", 2: "two", 3: "three"}


def _load_function(spec: str, arguments: tuple[str, ...] = ("prompt", "policy_response", "reference_response")) -> Callable[..., Any]:
    """The callable named by ``"module:function"`` or ``"path/file.py:function"`` (dotted attributes
    allowed), checked to accept the named ``arguments``."""
    if not isinstance(spec, str) or spec.count(":") < 1:
        raise PreftuneError(f"a judge is given as 'module:function' or 'path/to/file.py:function', got {spec!r}.")
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr or not all(part.isidentifier() for part in attr.split(".")):
        raise PreftuneError(f"a judge is given as 'module:function' or 'path/to/file.py:function', got {spec!r}.")
    module = _import(module_name, spec)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise PreftuneError(f"judge '{spec}': '{module_name}' has no attribute '{attr}' (callables there: {', '.join(names[:10]) or 'none'}).")
        obj = getattr(obj, part)
    if not callable(obj):
        raise PreftuneError(f"judge '{spec}': '{attr}' is a {type(obj).__name__}, not a function.")
    return accepting(obj, spec, arguments)


def accepting(obj: Callable[..., Any], spec: str, arguments: tuple[str, ...]) -> Callable[..., Any]:
    """``obj`` itself, once checked to accept the named ``arguments`` (a judge given in Python or by name)."""
    try:
        inspect.signature(obj).bind(None, *[""] * (len(arguments) - 1))
    except TypeError:
        raise PreftuneError(f"judge '{spec}' must accept {_COUNT.get(len(arguments), len(arguments))} arguments ({', '.join(arguments)}).") from None
    except ValueError:
        pass  # no signature to inspect (some builtins): the first call will tell
    return obj


def _import(module_name: str, spec: str) -> Any:
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise PreftuneError(f"judge '{spec}': the file '{module_name}' does not exist.")
        name = f"preftune_judge_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        try:
            loader_spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[name]
            raise PreftuneError(f"judge '{spec}': running '{module_name}' failed: {type(err).__name__}: {err}") from err
        return module
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise PreftuneError(
                f"judge '{spec}': no module named '{module_name}' (is its folder on PYTHONPATH? "
                "a file can be given as path/to/file.py:function)."
            ) from None
        raise PreftuneError(f"judge '{spec}': importing '{module_name}' failed: {err}") from err
    except Exception as err:
        raise PreftuneError(f"judge '{spec}': importing '{module_name}' failed: {type(err).__name__}: {err}") from err

"""What the loop tells the outside while it runs: callbacks, and the likelihood-displacement watch.

A callback is a callable ``fn(step, metrics)`` (called on every log line), or an object with
any of ``on_log``, ``on_step_end``, ``on_evaluate`` and ``on_save``, each called as
``method(step, metrics)`` (for ``on_save`` the metrics are ``{"path": checkpoint folder}``).
A callback that returns ``True`` asks the run to stop: the loop finishes the step it is in
(logging, checkpoint), evaluates, saves the final model and returns normally, with
``stopped_by`` naming the callback. Exceptions from a callback propagate: a bug in one stops the
run loudly.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

EVENTS = ("on_log", "on_step_end", "on_evaluate", "on_save")


class Callbacks:
    """The run's callbacks, normalised; :meth:`fire` calls them and says who asked to stop."""

    def __init__(self, callbacks: Sequence[Any] = ()) -> None:
        self.hooks: dict[str, list[tuple[str, Any]]] = {event: [] for event in EVENTS}
        for callback in callbacks:
            found = False
            for event in EVENTS:
                method = getattr(callback, event, None)
                if callable(method):
                    self.hooks[event].append((type(callback).__name__, method))
                    found = True
            if not found:
                if not callable(callback):
                    raise TypeError(f"a callback must be callable or have one of {', '.join(EVENTS)}; got {callback!r}")
                self.hooks["on_log"].append((getattr(callback, "__name__", type(callback).__name__), callback))

    def fire(self, event: str, step: int, metrics: dict[str, Any]) -> str | None:
        """Call every hook of ``event``; the name of the first that returned True, if any."""
        stop = None
        for name, hook in self.hooks[event]:
            if hook(step, dict(metrics)) is True and stop is None:
                stop = f"{name}.{event}"
        return stop


class DisplacementWatch:
    """Warn once when chosen log-probs keep falling while margins grow.

    This is likelihood displacement (Razin et al. 2024, arXiv:2410.08847): DPO can widen the
    margin by pushing both completions down, which is the most common "is my run broken?"
    question. Three falling logs in a row, with margins rising over the same logs, trigger it.
    """

    def __init__(self, patience: int = 3) -> None:
        self.patience = patience
        self.history: list[tuple[float, float]] = []
        self.warned = False

    def update(self, means: dict[str, float], step: int) -> None:
        if self.warned or "logps/chosen" not in means or "rewards/margins" not in means:
            return
        self.history.append((means["logps/chosen"], means["rewards/margins"]))
        recent = self.history[-(self.patience + 1) :]
        if len(recent) <= self.patience:
            return
        falling = all(b[0] < a[0] for a, b in zip(recent, recent[1:]))
        widening = all(b[1] > a[1] for a, b in zip(recent, recent[1:]))
        if falling and widening:
            self.warned = True
            warnings.warn(
                f"step {step}: logps/chosen has fallen for {self.patience} logs in a row while "
                "rewards/margins grew: likelihood displacement (both completions pushed down). "
                "Consider loss.nll_alpha > 0, a lower train.lr, or a larger loss.beta.",
                stacklevel=2,
            )

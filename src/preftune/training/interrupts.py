"""SIGTERM and SIGINT during training: finish the step, checkpoint, say where, exit non-zero.

While :func:`preftune.training.loop.fit` runs, the first SIGTERM or SIGINT only sets a flag; the loop
looks at it after each optimizer step, writes a checkpoint there (unless one was just written),
and raises :class:`Interrupted`, whose message says where the checkpoint is and how to continue,
and whose exit status is the shell's (143 for SIGTERM, 130 for SIGINT).

A signal sent to the whole launch (Ctrl-C in a terminal, ``timeout``, a scheduler's SIGTERM to
the process group) reaches each worker twice: directly, and again a moment later from
``torchrun``'s shutdown, which forwards it to its workers. That repeat is not a user asking
twice, so a second signal within :data:`GRACE_SECONDS` of the first is the same stop; one after
it stops at once (:class:`StoppedAtOnce`, a ``KeyboardInterrupt`` naming the signal). Handlers
can only be set from the main thread; elsewhere (a caller's worker thread) signals keep their
usual effect.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType
from typing import Any

from preftune.errors import TrainingError
from preftune.system.distributed import all_gather

SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: A repeat within this many seconds of the first signal is the launcher forwarding it, not a user.
GRACE_SECONDS = 5.0


class StoppedAtOnce(KeyboardInterrupt):
    """A second stop signal, after the grace period: training ends now, without a checkpoint."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Interrupted(TrainingError):
    """Training stopped on a signal after a complete step (and a checkpoint)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class StopSignals:
    """A context manager: the first SIGTERM/SIGINT is recorded in :attr:`received`, not acted on;
    a repeat within :attr:`grace` seconds is ignored, a later one stops at once."""

    def __init__(self, grace: float = GRACE_SECONDS) -> None:
        self.received: int | None = None
        self.grace = grace
        self._received_at = 0.0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received, self._received_at = signum, time.monotonic()
        elif time.monotonic() - self._received_at >= self.grace:  # asked again, well after the first: stop now
            raise StoppedAtOnce(signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def pending(self, processes: int = 1) -> int | None:
        """The signal to stop on, agreed by every process (one that got none stops with the others)."""
        if processes > 1:
            received = [signum for signum in all_gather(self.received) if signum]
            self.received = self.received or (received[0] if received else None)
        return self.received

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

"""SIGTERM and SIGINT during training: finish the step, checkpoint, say where, exit non-zero.

While :func:`preftune.training.loop.fit` runs, the first SIGTERM or SIGINT only sets a flag; the loop
looks at it after each optimizer step, writes a checkpoint there (unless one was just written),
and raises :class:`Interrupted`, whose message says where the checkpoint is and how to continue,
and whose exit status is the shell's (143 for SIGTERM, 130 for SIGINT). A second signal stops at
once (``KeyboardInterrupt``). Handlers can only be set from the main thread; elsewhere (a caller's
worker thread) signals keep their usual effect.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from preftune.errors import TrainingError
from preftune.system.distributed import all_gather

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(TrainingError):
    """Training stopped on a signal after a complete step (and a checkpoint)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class StopSignals:
    """A context manager: the first SIGTERM/SIGINT is recorded in :attr:`received`, not acted on."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # asked twice: stop now
            raise KeyboardInterrupt
        self.received = signum

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

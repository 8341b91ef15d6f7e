"""Progress on stderr for every step that can take more than a few seconds.

:func:`batches` walks a list in batches with a tqdm bar (items and rate); :func:`counter` counts
what a stream of unknown length has done (records read and tokenized, and their rate);
:func:`status` prints one line with a rate once a step is done. Both are silent when progress is off (``train.progress
= false``, or a caller that passes ``enabled=False``) and for steps too short to matter.
:func:`quiet_transformers_bars` silences transformers' own per-file bars ("Loading weights",
"Writing model shards") while preftune's say what is happening, and puts them back after.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: seconds a step runs before its bar shows: a step that ends sooner shows nothing (no flicker of
#: short bars inside a run)
DELAY = 2.0


def batches(total: int, batch_size: int, *, desc: str, enabled: bool = True) -> Iterator[int]:
    """The start index of each batch of ``batch_size`` in ``range(total)``, with a bar counting items."""
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit="item", leave=False, disable=not enabled, file=sys.stderr, delay=DELAY) as bar:
        for start in range(0, total, batch_size):
            yield start
            bar.update(min(batch_size, total - start))


@contextmanager
def counter(desc: str, *, unit: str, enabled: bool = True) -> Iterator[Any]:
    """A bar without a total for a stream (``bar.update(n)`` as items are done): count and rate."""
    from tqdm.auto import tqdm

    with tqdm(desc=desc, unit=f" {unit}", leave=False, disable=not enabled, file=sys.stderr, delay=DELAY) as bar:
        yield bar


@contextmanager
def quiet_transformers_bars() -> Iterator[None]:
    """transformers' progress bars off for the block, as they were after it."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def status(what: str, count: int, seconds: float, *, enabled: bool = True, at_least: float = 2.0) -> None:
    """``preftune: WHAT: COUNT in S s (R/s)`` on stderr, when enabled and the step took ``at_least`` seconds."""
    if enabled and seconds >= at_least:
        print(f"preftune: {what}: {count} in {seconds:.1f} s ({count / seconds:.0f}/s)", file=sys.stderr)

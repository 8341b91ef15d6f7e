"""One process, one or more preftune runs (``python -m benchmarks.run_preftune ...``; bench.py runs them
through :mod:`benchmarks.runners`).

Each run builds its task exactly as ``preftune dpo`` does (``preftune.stages.dpo.build_task``)
and trains it with the one loop, ``preftune.training.loop.fit``; the benchmark only wraps the collator to
time each step. A run name picks which speed and memory work is on (``VARIANTS``, through the
config: prefix sharing, the reference strategy, gradient checkpointing, LoRA), so each is
measured on its own; the full-logits baseline passes its scorer class to ``build_task``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import (
    VARIANTS,
    Settings,
    StepClock,
    Variant,
    batch_order,
    child_main,
    dpo_config,
    real_tokens,
    result,
)
from preftune.logprobs import naive_completion_logps


class FullLogitsLogps(nn.Module):
    """The textbook scorer: the model's full logits, log_softmax in fp32, then gather (the baseline)."""

    def __init__(self, model: nn.Module, *, chunk_size: int = 0) -> None:  # chunk_size: the scorers' signature; unused
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
        return naive_completion_logps(logits, labels)


def prepare(cfg: Any, variant: Variant, run_dir: Path, run: Any) -> tuple[Any, dict]:
    """The task as ``preftune dpo`` builds it (``stages.dpo.build_task``) in the open ``run``, and what the
    reference cost (the cache pass, when cold)."""
    from preftune.stages.dpo import build_task

    task = build_task(cfg, run, scorer_cls=FullLogitsLogps if variant.logps == "full" else None)
    report = json.loads((run_dir / "data_report.json").read_text())["train"]
    if report["kept"] != report["records"] or any(report["truncation"].values()):
        raise RuntimeError(f"the fixture lost records in tokenization: {report}")
    reference = json.loads((run_dir / "reference.json").read_text())
    layout = "prefix_shared" if variant.layout == "shared" else "concatenated"
    if reference["layout"] != layout:
        raise RuntimeError(f"{variant}: the stage chose the {reference['layout']} layout ({reference.get('prefix_sharing_off')})")
    if not variant.reference.startswith("cache"):
        return task, {}
    cache = reference["train_cache"]
    if cache["warm"] != (variant.reference == "cache-warm"):
        raise RuntimeError(f"{variant.reference}: the cache was {'warm' if cache['warm'] else 'cold'}; run cache-cold before cache-warm")
    return task, {"cache_seconds": cache["seconds"], "cache_warm": cache["warm"], "cache_pairs": len(task.train_set),
                  "cache_tokens": sum(real_tokens(p) for p in task.train_set)}


@contextmanager
def unfused_adamw(enabled: bool) -> Iterator[None]:
    """Measure what preftune's fused AdamW buys: this run gets the single-tensor one.

    The single-tensor AdamW runs ~10 elementwise kernels per parameter tensor; the fused one runs
    one. On a CPU whose other cores are busy, every parallel kernel can wait a scheduler time
    slice for its second thread, so the kernel count, not the arithmetic, sets the cost.
    """
    import preftune.training.optim as loop

    original = loop._can_fuse
    if enabled:
        loop._can_fuse = lambda params: False
    try:
        yield
    finally:
        loop._can_fuse = original


def marking(collate: Callable[[list], dict], clock: Any, consumed: list[list[int]], on_step: Callable[[int], None] | None) -> Callable:
    """``collate`` that marks each step on ``clock`` and records its batch in ``consumed``: fit collates a
    step's batch first thing, so the call for step k+1 marks the end of step k."""

    def timed_collate(items: list) -> dict:
        clock.mark(len(consumed))
        if on_step is not None:
            on_step(len(consumed))
        consumed.append([p.index for p in items])
        return collate(items)

    return timed_collate


def run_one(name: str, settings: Settings, fixtures: Path, workdir: Path, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train one variant for warm-up + timed steps; return its JSON record."""
    from benchmarks.fixtures import Fixtures
    from preftune.stages.lifecycle import open_run

    variant = VARIANTS[name]
    fx = Fixtures(fixtures)
    model_dir, records = fx.model(settings.model), fx.records(settings.smoke)
    run_dir = workdir / f"preftune-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cache_dir = workdir / "reference-cache"
    cfg = dpo_config(settings, variant, model_dir, records, run_dir, cache_dir)
    if variant.reference == "cache-cold":
        shutil.rmtree(cache_dir, ignore_errors=True)  # cold means cold: this run pays for the reference pass
    with open_run(cfg) as run:
        task, cost = prepare(cfg, variant, run_dir, run)
        clock, consumed = StepClock(), []
        with unfused_adamw(variant.unfused_adam):
            run.fit(dataclasses.replace(task, collate=marking(task.collate, clock, consumed, on_step)))
        clock.mark(len(consumed))
    train = task.train_set

    expected = batch_order(len(train), task.lengths, settings, grouped=variant.order == "grouped")[: settings.total_steps]
    if consumed != expected:
        raise RuntimeError(f"{name}: fit ran other batches than the benchmark's order")
    timed = [train[i] for batch in consumed[settings.warmup_steps :] for i in batch]
    tokens = sum(real_tokens(p) for p in timed)
    seconds = clock.timed_seconds(settings)
    reference_tokens = 0 if variant.reference.startswith("cache") else tokens
    extra: dict[str, Any] = {"variant": variant.__dict__, "bf16": variant.bf16, **cost}
    if variant.reference == "cache-cold":
        # The reference pass covers one epoch; charge the timed steps their share of it.
        share = len(timed) / cost["cache_pairs"]
        seconds += cost["cache_seconds"] * share
        reference_tokens = tokens
        extra["cache_charged_seconds"] = cost["cache_seconds"] * share
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    if variant.compile:  # compiled in the warm-up steps (first shape, then the dynamic one): outside the timed ones
        at_warmup, at_end = steps[settings.warmup_steps - 1], steps[-1]
        extra.update({"compile_seconds": at_end.get("compile/seconds", 0.0), "compile_graphs": at_end.get("compile/graphs", 0),
                      "compile_seconds_in_timed_steps": at_end.get("compile/seconds", 0.0) - at_warmup.get("compile/seconds", 0.0)})
    metrics = {key: [line[key] for line in steps] for key in ("rewards/margins", "logps/chosen", "logps/rejected")}
    return result(run=name, framework="preftune", settings=settings, model_dir=model_dir, seconds=seconds, tokens=tokens,
                  reference_tokens=reference_tokens, losses=[line["loss"] for line in steps], metrics=metrics, extra=extra)


def main() -> None:
    child_main(run_one, __doc__)


if __name__ == "__main__":
    main()

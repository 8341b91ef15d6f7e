"""A beta sweep's cost: ``sweep`` (preftune, one reference pass) against ``trl-sweep`` (three TRL runs).

bench.py starts ``sweep`` and ``trl-sweep`` by name (:data:`benchmarks.runners.RUNNERS`). The sweep is
DPO with beta 0.05, 0.1 and 0.2, each value trained for the benchmark's warm-up + timed steps (2 + 20)
on batch 8, max length 512, fp32.

- The data is the pairs TRL's ``trl`` run trains on (the first warm-up + timed batches of its
  random order), written to their own file: one epoch is exactly the steps each value trains, so
  the reference pass scores exactly the pairs the three trainings use, no more.
- ``sweep`` calls :func:`preftune.stages.sweep.run_sweep`, the code behind ``preftune dpo
  --sweep loss.beta=0.05,0.1,0.2``: the first value computes the reference log-probs into the
  on-disk cache, the other two read it. The benchmark only observes: ``dpo.build_task`` is wrapped
  to time each training's steps and its reference pass. Then a single ``preftune dpo`` run with
  beta 0.1 (reference: the frozen copy, scored at every step) on the same batches must give the
  sweep's beta=0.1 losses (within ``SAME_RESULTS_TOLERANCE``; bench.py fails otherwise): the
  sweep must not change results.
- ``trl-sweep`` runs TRL 1.16's ``DPOTrainer`` three times, as the ``trl`` run is set up, each in
  its own process as a user would run it (in one process under ``--smoke``), each scoring its
  reference at every step (TRL's default).

What the total counts, on both sides: every training step of the three values (warm-up steps
included) and, for preftune, the reference pass (loading the reference copy, scoring the pairs,
writing the cache) and the two cache reads. Neither side counts imports, model loading, data
tokenization or saving the final model; ``wall_seconds`` (after imports, to the end) has them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import (
    VARIANTS,
    Settings,
    StepClock,
    as_json,
    batch_order,
    dpo_config,
    peak_rss_bytes,
    preftune_pairs,
    real_tokens,
    result,
)

#: The swept values, as ``--sweep loss.beta=...`` takes them.
BETAS = ("0.05", "0.1", "0.2")
#: The value compared with a single run (the benchmark's beta).
SINGLE = "0.1"
#: The sweep's beta=0.1 losses against a single run's on the same batches (cached vs on-the-fly reference).
SAME_RESULTS_TOLERANCE = 1e-5


def sweep_records(settings: Settings, fixtures: Path, workdir: Path) -> Path:
    """The records the ``trl`` run trains on, in file order, written once per workdir (deterministic)."""
    from benchmarks.fixtures import Fixtures

    source = Fixtures(fixtures).records(settings.smoke)
    lines = source.read_text(encoding="utf-8").splitlines()
    used = settings.total_steps * settings.batch_size
    if used > len(lines):
        raise RuntimeError(f"{source} has {len(lines)} records; the sweep needs {used}")
    # the random order does not depend on the lengths (benchmarks.common.batch_order)
    order = batch_order(len(lines), [0] * len(lines), settings, grouped=False)[: settings.total_steps]
    chosen = sorted(i for batch in order for i in batch)
    path = workdir / f"sweep-records-{settings.model}-{len(chosen)}.jsonl"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("".join(lines[i] + "\n" for i in chosen), encoding="utf-8")
    os.replace(tmp, path)
    return path


@contextmanager
def watch_builds() -> Iterator[list[dict[str, Any]]]:
    """Time every task ``preftune.stages.dpo.build_task`` builds: its steps (at each collate) and
    the end of training (when the final model starts saving). Nothing else changes."""
    from preftune.stages import dpo

    original = dpo.build_task
    builds: list[dict[str, Any]] = []

    def build_task(cfg: Any, run: Any, **kwargs: Any) -> Any:
        task = original(cfg, run, **kwargs)
        watch: dict[str, Any] = {"cfg": cfg, "pairs": task.train_set, "lengths": task.lengths, "clock": StepClock(),
                                 "consumed": [], "save_seconds": 0.0}
        builds.append(watch)

        def timed_collate(items: list) -> dict:
            watch["clock"].mark(len(watch["consumed"]))  # the call for step k+1 marks the end of step k
            watch["consumed"].append([p.index for p in items])
            return task.collate(items)

        def timed_save(folder: Path) -> None:
            watch["clock"].mark(len(watch["consumed"]))
            started = time.perf_counter()
            task.save_final(folder)
            watch["save_seconds"] = time.perf_counter() - started

        return dataclasses.replace(task, collate=timed_collate, save_final=timed_save,
                                   save_model=task.save_model or task.save_final)

    dpo.build_task = build_task
    try:
        yield builds
    finally:
        dpo.build_task = original


def _trained(watch: dict[str, Any], settings: Settings, run_dir: Path) -> dict[str, Any]:
    """One training's numbers; checks it ran the benchmark's batches and every pair once."""
    pairs = watch["pairs"]
    expected = batch_order(len(pairs), watch["lengths"], settings, grouped=True)[: settings.total_steps]
    if watch["consumed"] != expected:
        raise RuntimeError(f"{run_dir}: fit ran other batches than the benchmark's order")
    if sorted(i for b in watch["consumed"] for i in b) != list(range(len(pairs))):
        raise RuntimeError(f"{run_dir}: the steps did not cover every pair of the sweep's data exactly once")
    clock = watch["clock"]
    timed = [pairs[i] for batch in watch["consumed"][settings.warmup_steps :] for i in batch]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    reference = json.loads((run_dir / "reference.json").read_text())
    return {
        "train_seconds": clock.marks[settings.total_steps] - clock.marks[0],
        "timed_seconds": clock.timed_seconds(settings),
        "timed_tokens": sum(real_tokens(p) for p in timed),
        "tokens_per_s": sum(real_tokens(p) for p in timed) / clock.timed_seconds(settings),
        "save_seconds": watch["save_seconds"],
        "reference": reference["strategy"],
        "reference_cache": reference.get("train_cache"),
        "losses": [s["loss"] for s in steps],
        "metrics": {k: [s[k] for s in steps] for k in ("rewards/margins", "logps/chosen", "logps/rejected")},
    }


def run_preftune_sweep(settings: Settings, fixtures: Path, workdir: Path) -> dict[str, Any]:
    """``preftune dpo --sweep loss.beta=0.05,0.1,0.2`` on the sweep's data; then the single run to compare."""
    from benchmarks.fixtures import Fixtures
    from preftune.stages import dpo
    from preftune.stages.sweep import run_sweep

    model_dir = Fixtures(fixtures).model(settings.model)
    records = sweep_records(settings, fixtures, workdir)
    root, cache_dir = workdir / "preftune-sweep", workdir / "sweep-reference-cache"
    for folder in (root, cache_dir, workdir / "preftune-sweep-single"):
        shutil.rmtree(folder, ignore_errors=True)  # cold: the sweep pays for its reference pass
    cfg = dpo_config(settings, VARIANTS["prefix"], model_dir, records, root, cache_dir)
    cfg.train.report = False  # not training: a user who wants the HTML report waits for it on either side
    started = time.perf_counter()
    with watch_builds() as builds:
        run_sweep(cfg, [f"loss.beta={','.join(BETAS)}"])
    wall = time.perf_counter() - started
    peak = peak_rss_bytes()  # before the single run below, which holds a frozen reference copy

    summary = json.loads((root / "sweep.json").read_text())
    warm = [r["reference_warm"] for r in summary["runs"]]
    if len(builds) != len(BETAS) or summary["reference_passes"] != 1 or warm != [False] + [True] * (len(BETAS) - 1):
        raise RuntimeError(f"the sweep did not compute its reference once and read it after: {summary}")
    values = {}
    for beta, watch in zip(BETAS, builds):
        if watch["cfg"].loss.beta != float(beta):
            raise RuntimeError(f"sweep run {watch['cfg'].train.output_dir} trained beta {watch['cfg'].loss.beta}, not {beta}")
        values[beta] = _trained(watch, settings, root / f"beta-{beta}")
    reference_pass = values[BETAS[0]]["reference_cache"]["seconds"]
    cache_reads = [values[b]["reference_cache"]["seconds"] for b in BETAS[1:]]
    total = reference_pass + sum(cache_reads) + sum(v["train_seconds"] for v in values.values())

    # The same training alone, as `preftune dpo` runs it (frozen reference copy, scored every step).
    single_cfg = dpo_config(dataclasses.replace(settings, beta=float(SINGLE)), VARIANTS["prefix"], model_dir, records,
                            workdir / "preftune-sweep-single", cache_dir)
    single_cfg.train.report = False
    with watch_builds() as single_builds:
        dpo.run(single_cfg)
    single = _trained(single_builds[0], settings, workdir / "preftune-sweep-single")
    if single["reference"] != "copy":
        raise RuntimeError(f"the single run's reference is {single['reference']}, not a frozen copy")
    mine = values[SINGLE]
    # judged by bench.py (sweep_cost): a difference fails the command but keeps the row's numbers
    worst = (max(abs(a - b) for a, b in zip(mine["losses"], single["losses"]))
             if len(mine["losses"]) == len(single["losses"]) else float("inf"))

    pairs = builds[0]["pairs"]
    tokens = sum(real_tokens(p) for p in pairs)  # each value trains on every pair once (checked in _trained)
    per_value = [{"beta": float(b), **{k: v for k, v in values[b].items() if k != "metrics"}} for b in BETAS]
    extra = {
        "peak_rss_bytes": peak,
        "sweep": {"betas": [float(b) for b in BETAS], "steps_per_value": settings.total_steps, "pairs": len(pairs),
                  "reference_passes": summary["reference_passes"], "reference_pass_seconds": reference_pass,
                  "reference_pass_tokens": tokens, "cache_read_seconds": cache_reads, "total_seconds": total,
                  "wall_seconds": wall, "per_value": per_value,
                  "same_as_single_run": {"beta": float(SINGLE), "max_loss_diff": worst, "single_losses": single["losses"],
                                         "bound": SAME_RESULTS_TOLERANCE}},
        "note": "seconds: reference pass + cache reads + every step of 3 trainings; real_tokens: all 3 trainings' tokens",
    }
    return result(run="sweep", framework="preftune", settings=settings, model_dir=model_dir, seconds=total,
                  tokens=tokens * len(BETAS), reference_tokens=tokens, losses=mine["losses"], metrics=mine["metrics"], extra=extra)


def run_trl_value(settings: Settings, fixtures: Path, workdir: Path) -> dict[str, Any]:
    """One TRL run at ``settings.beta`` on the sweep's data, set up as the ``trl`` run is."""
    from benchmarks import run_trl

    records = sweep_records(settings, fixtures, workdir)
    started = time.perf_counter()
    record = run_trl.run("trl", settings, fixtures, workdir, records_path=records, out_name=f"trl-sweep-beta-{settings.beta}")
    record.update(run="trl-sweep-value", beta=settings.beta, wall_seconds=time.perf_counter() - started)
    return record


def run_trl_sweep(settings: Settings, fixtures: Path, workdir: Path) -> dict[str, Any]:
    """Three TRL runs, one per beta: each its own process (in this one under ``--smoke``)."""
    from benchmarks.fixtures import Fixtures

    runs = []
    for beta in BETAS:
        one = dataclasses.replace(settings, beta=float(beta))
        if settings.smoke:
            runs.append(run_trl_value(one, fixtures, workdir))
            continue
        out, log = workdir / f"trl-sweep-{beta}.jsonl", workdir / "logs" / f"trl-sweep-{beta}.log"
        out.unlink(missing_ok=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "benchmarks.runners", "--settings", as_json(one), "--fixtures", str(fixtures),
                   "--workdir", str(workdir), "--out", str(out), "--runs", "trl-sweep-value"]
        with log.open("w") as f:  # the environment bench.py gave this process (threads, offline, no MALLOC_)
            code = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], stdout=f, stderr=subprocess.STDOUT).returncode
        if code != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"TRL at beta {beta} failed (exit {code}); log {log}:\n{tail}")
        runs.append(json.loads(out.read_text().splitlines()[-1]))

    model_dir = Fixtures(fixtures).model(settings.model)
    records = sweep_records(settings, fixtures, workdir)
    tokens = sum(real_tokens(p) for p in preftune_pairs(settings, model_dir, records, workdir / "sweep-pairs"))
    total = sum(r["train_seconds"] for r in runs)
    middle = runs[BETAS.index(SINGLE)]
    per_value = [{"beta": r["beta"], "train_seconds": r["train_seconds"], "timed_seconds": r["seconds"],
                  "tokens_per_s": r["tokens_per_s"], "peak_rss_bytes": r["peak_rss_bytes"], "wall_seconds": r["wall_seconds"],
                  "losses": r["losses"]} for r in runs]
    extra = {
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),  # the largest of the three processes
        "sweep": {"betas": [float(b) for b in BETAS], "steps_per_value": settings.total_steps, "processes": 1 if settings.smoke else 3,
                  "total_seconds": total, "wall_seconds": sum(r["wall_seconds"] for r in runs), "per_value": per_value},
        "note": "seconds: every step of 3 TRL runs, each scoring its reference every step; real_tokens: all 3 runs' tokens",
    }
    return result(run="trl-sweep", framework="trl", settings=settings, model_dir=model_dir, seconds=total,
                  tokens=tokens * len(BETAS), reference_tokens=tokens * len(BETAS), losses=middle["losses"],
                  metrics={k: middle[f"per_step/{k}"] for k in ("rewards/margins", "logps/chosen", "logps/rejected")},
                  extra=extra)


def sweep_cost(records: list[dict[str, Any]]) -> tuple[list[str], bool]:
    """The comparison bench.py prints: total seconds of the sweep against TRL's three runs, and the
    ratio; and whether the sweep's beta=0.1 losses are a single run's (within SAME_RESULTS_TOLERANCE)."""
    by_run = {r["run"]: r for r in records}
    lines, same_results = [], True
    ours, theirs = by_run.get("sweep"), by_run.get("trl-sweep")
    if ours:
        s = ours["sweep"]
        trainings = ", ".join(f"{v['train_seconds']:.1f}" for v in s["per_value"])
        rates = ", ".join(f"{v['beta']:g}: {v['tokens_per_s']:.0f}" for v in s["per_value"])
        same = s["same_as_single_run"]
        lines.append(f"sweep: betas {', '.join(f'{b:g}' for b in s['betas'])}, {s['steps_per_value']} steps each on {s['pairs']} pairs: "
                     f"{s['total_seconds']:.1f} s = reference pass {s['reference_pass_seconds']:.1f} s (once) + cache reads "
                     f"{sum(s['cache_read_seconds']):.2f} s + trainings {trainings} s; timed tokens/s {rates}; "
                     f"{ours['real_tokens']} real tokens; wall after imports {s['wall_seconds']:.1f} s")
        same_results = same["max_loss_diff"] <= same["bound"]
        lines.append(f"sweep beta={same['beta']:g} vs a single preftune run (frozen reference copy, same batches): losses differ "
                     f"by at most {same['max_loss_diff']:.2e} ({'OK' if same_results else 'FAIL'}, bound {same['bound']:g})")
    if theirs:
        s = theirs["sweep"]
        runs = ", ".join(f"{v['train_seconds']:.1f}" for v in s["per_value"])
        rates = ", ".join(f"{v['beta']:g}: {v['tokens_per_s']:.0f}" for v in s["per_value"])
        lines.append(f"trl-sweep: {len(s['per_value'])} DPOTrainer runs in {s['processes']} process(es): {s['total_seconds']:.1f} s "
                     f"= {runs} s; timed tokens/s {rates}; {theirs['real_tokens']} real tokens; wall after imports "
                     f"{s['wall_seconds']:.1f} s")
    if ours and theirs:
        lines.append(f"sweep vs trl-sweep: {ours['sweep']['total_seconds']:.1f} s against {theirs['sweep']['total_seconds']:.1f} s: "
                     f"{theirs['sweep']['total_seconds'] / ours['sweep']['total_seconds']:.2f}x faster "
                     f"(wall after imports {theirs['sweep']['wall_seconds'] / ours['sweep']['wall_seconds']:.2f}x)")
    return lines, same_results


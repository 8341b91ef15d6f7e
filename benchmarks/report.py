"""The table of a benchmark's runs, the ratios to TRL, and the equivalence check."""

from __future__ import annotations

import math
from typing import Any

from benchmarks.common import BASELINE, TRL_RUNS, VARIANTS, machine_key

#: preftune's loss after N steps must match TRL's on the same batches (the issue's bound).
LOSS_TOLERANCE = 1e-4
GIB = 1024**3


def baseline_of(run: str) -> str:
    return BASELINE.get(run, "trl")


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


class MixedMachines(ValueError):
    """Rows measured on different processors (or core counts, or torch versions): not comparable."""


def check_one_machine(records: list[dict[str, Any]]) -> str:
    """The one machine all ``records`` ran on; :class:`MixedMachines` when they ran on several."""
    keys = {machine_key(r) for r in records}
    if len(keys) > 1:
        by_key = {k: [r["run"] for r in records if machine_key(r) == k] for k in sorted(keys)}
        raise MixedMachines("rows from different machines cannot be compared: "
                            + "; ".join(f"{k}: {', '.join(runs)}" for k, runs in by_key.items()))
    return keys.pop() if keys else "no rows"


def table(records: list[dict[str, Any]]) -> str:
    """A fixed-width table: one row per run, ratios against its TRL baseline (and TRL with MALLOC settings).
    Refuses (:class:`MixedMachines`) rows from different machines."""
    check_one_machine(records)
    by_run = {r["run"]: r for r in records}
    header = ("run", "tokens/s", "x TRL", "x TRL-malloc", "peak RSS GiB", "RSS / TRL", "GFLOP/s", "% peak", "first loss", "final loss")
    rows = [header]
    for r in records:
        base = by_run.get(baseline_of(r["run"])) if r["framework"] == "preftune" else None
        malloc = by_run.get("trl-malloc") if r["framework"] == "preftune" and baseline_of(r["run"]) == "trl" else None
        rows.append((
            r["run"],
            f"{r['tokens_per_s']:.0f}",
            ratio(r["tokens_per_s"], base and base["tokens_per_s"]),
            ratio(r["tokens_per_s"], malloc and malloc["tokens_per_s"]),
            f"{r['peak_rss_bytes'] / GIB:.2f}",
            ratio(r["peak_rss_bytes"], base and base["peak_rss_bytes"]),
            f"{r['flops_per_s'] / 1e9:.1f}",
            f"{100 * r['utilization']:.1f}" if r.get("utilization") is not None else "-",
            f"{r['first_loss']:.6f}",
            f"{r['final_loss']:.6f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def equivalence(records: list[dict[str, Any]]) -> tuple[list[str], bool]:
    """Per-step losses of every preftune run fed TRL's batch order, against every plain TRL run.

    Returns readable lines and whether all agree within LOSS_TOLERANCE. Runs in another order
    (length grouped) train on other batches, so their losses are not comparable step by step.
    """
    lines, ok = [], True
    # the sweep rows (benchmarks/sweep.py) train on their own data: not compared here
    trl_runs = [r for r in records if r["run"] in TRL_RUNS and not r.get("trl_run", {}).get("lora") and not r.get("bf16")]
    same_order = [r for r in records if r["run"] in VARIANTS and VARIANTS[r["run"]].order == "random"]
    for ours in same_order:
        for theirs in trl_runs:
            if len(ours["losses"]) != len(theirs["losses"]):
                lines.append(f"{ours['run']} vs {theirs['run']}: different step counts")
                ok = False
                continue
            worst = max(abs(a - b) for a, b in zip(ours["losses"], theirs["losses"]))
            final = abs(ours["final_loss"] - theirs["final_loss"])
            good = worst <= LOSS_TOLERANCE and all(math.isfinite(x) for x in ours["losses"] + theirs["losses"])
            ok &= good
            lines.append(f"{ours['run']} vs {theirs['run']}: loss after {len(ours['losses'])} steps differs by {final:.2e}, "
                         f"at most {worst:.2e} over all steps ({'OK' if good else 'FAIL'}, bound {LOSS_TOLERANCE:g})")
    if not same_order or not trl_runs:
        lines.append("equivalence not checked: it needs a preftune run in TRL's order (plain or parity) and a TRL run")
    return lines, ok


def finite(record: dict[str, Any]) -> bool:
    """Every number the table shows is finite and positive where it must be."""
    numbers = [record["tokens_per_s"], record["peak_rss_bytes"], record["flops_per_s"], record["first_loss"], record["final_loss"]]
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers) and record["tokens_per_s"] > 0


#: (bf16 run, its fp32 twin): the same batches in the same order, only the precision differs
BF16_TWINS = (("bf16", "prefix"), ("trl-bf16", "trl"))


def bf16_cost(records: list[dict[str, Any]]) -> list[str]:
    """What bf16 autocast costs in accuracy: its per-step chosen log-probs and losses against the
    fp32 run on the same batches. The first step is the clean comparison (the same weights); later
    steps also carry the drift of training in bf16."""
    by_run = {r["run"]: r for r in records}
    lines = []
    for low, full in BF16_TWINS:
        if low not in by_run or full not in by_run:
            continue
        a, b = by_run[low], by_run[full]
        logps_a, logps_b = a["per_step/logps/chosen"], b["per_step/logps/chosen"]
        first_rel = abs(logps_a[0] - logps_b[0]) / max(abs(logps_b[0]), 1e-12)
        worst_loss = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
        lines.append(f"{low} vs {full}: step-1 logps/chosen differ by {first_rel:.2e} relative "
                     f"({logps_a[0]:.4f} vs {logps_b[0]:.4f}); losses by at most {worst_loss:.2e} over {len(a['losses'])} steps")
    return lines

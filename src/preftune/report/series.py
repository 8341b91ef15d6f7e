"""Reports over several runs: the rounds of `preftune iterate` side by side (here), and the policies
of a `preftune dpo --sweep` (:mod:`preftune.report.sweep`).

The iteration's page says in sentences what iterated (model, judge, rounds, each round's training
time, precision, processor), shows the rounds as one table (the judge's held-out score, the win
rate against the initial model and the KL to it, each with its 95% interval), and plots the judge's
score by round and against KL with those intervals as error bars. Built with
:mod:`preftune.report.html`'s toolkit. :func:`write_any` is what `preftune report FOLDER` calls:
an iteration folder (``iterate.json``), a sweep folder (``sweep.json``) or a single run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError
from preftune.report.html import escape, image, page, table, write_report
from preftune.report.plots import plot_panels
from preftune.report.runinfo import precision_text, read_json
from preftune.report.sweep import write_sweep_report
from preftune.report.text import listing, number, share_interval, value_interval
from preftune.stats import stderr_interval


def write_any(folder: str | Path) -> Path:
    """``folder/report.html`` for an iteration, a sweep or one run, whichever ``folder`` holds."""
    folder = Path(folder)
    if (folder / "iterate.json").is_file():
        return write_iteration_report(folder)
    if (folder / "sweep.json").is_file():
        return write_sweep_report(folder)
    return write_report(folder)


def _load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PreftuneError(f"{path}: cannot be read as JSON ({err}).") from None


def _pm(entry: dict[str, Any] | None) -> str:
    """A mean with its 95% interval from its standard error: ``0.412 [0.301, 0.523]``."""
    if not entry or entry.get("mean") is None:
        return "n/a"
    return value_interval(entry["mean"], stderr_interval(entry["mean"], entry.get("stderr")))


def _win(entry: dict[str, Any] | None) -> str:
    return share_interval(entry["win_rate"], entry["ci95"]) if entry else "n/a"


def _point(label: str, x: float, x_entry: dict[str, Any] | None, y_entry: dict[str, Any]) -> dict[str, Any]:
    """A point of :func:`~preftune.report.plots.plot_panels`: x (with the interval of ``x_entry``), the mean of ``y_entry``."""
    x_ci = stderr_interval(x_entry["mean"], x_entry.get("stderr")) if x_entry else None
    return {"label": label, "x": x, "x_ci": x_ci, "y": y_entry["mean"], "y_ci": stderr_interval(y_entry["mean"], y_entry.get("stderr"))}


# --------------------------------------------------------------------------- iterate
def iteration_rows(summary: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per round (round 0: the initial model): the numbers the report and the CLI show."""
    rows = [("0 (initial)", _pm(summary["initial"]["judge_score"]), "-", "0", "-", "-", "-")]
    for r in summary["rounds"]:
        pairing = r.get("pairing") or {}
        rows.append((str(r["round"]), _pm(r["judge_score"]), _win(r.get("win_rate_vs_initial")), _pm(r.get("kl_to_initial")),
                     f"{pairing.get('pairs', '?')} ({pairing.get('ties', '?')} ties dropped)",
                     _pm(pairing.get("sample_score")), number(r.get("steps"))))
    return rows


ITERATION_HEADER = ("round", "judge score (held-out)", "win rate vs initial", "KL to initial (nats)",
                    "pairs trained on", "judge score of training samples", "DPO steps")


def format_iteration(summary: dict[str, Any]) -> str:
    """The rounds as aligned text for a terminal."""
    rows = [ITERATION_HEADER, *iteration_rows(summary)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(ITERATION_HEADER))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def iteration_sentences(folder: Path, summary: dict[str, Any]) -> str:
    """The iteration in sentences: model, judge, rounds done, each round's training time, precision and processor."""
    rounds = summary["rounds"]
    first = read_json(folder / "round-1" / "status.json")
    times = listing([(f"round {r['round']}", read_json(folder / f"round-{r['round']}" / "status.json").get("seconds")) for r in rounds], " s")
    n = summary["initial"]["judge_score"].get("n")
    return (f"{len(rounds)} of {summary['rounds_planned']} rounds of iterative DPO done from {summary['initial'].get('path')}, "
            f"judged by {summary['judge']} on {number(n)} held-out samples per model (temperature 1). "
            f"Training times: {times or 'none yet'}. Precision: {precision_text(first)}. "
            f"Processor: {first.get('processor') or 'not recorded'}. 95% intervals in brackets.")


def write_iteration_report(folder: str | Path) -> Path:
    """``folder/report.html``: the rounds side by side, the judge's score per round, and score against KL."""
    folder = Path(folder)
    summary = _load(folder / "iterate.json")
    plots = folder / "plots"
    plots.mkdir(exist_ok=True)
    initial = summary["initial"]["judge_score"]
    rounds = summary["rounds"]
    body = [f"<h1>preftune iterate: {escape(folder.resolve().name)}</h1>", f"<p>{escape(iteration_sentences(folder, summary))}</p>",
            table("Rounds", iteration_rows(summary), ITERATION_HEADER)]
    if rounds:
        score = "judge score (held-out)"
        by_round = plot_panels([{"y_label": score, "points": [_point("initial", 0, None, initial)]
                                 + [_point(f"round {r['round']}", r["round"], None, r["judge_score"]) for r in rounds]}],
                               plots / "judge_by_round.png", xlabel="round", title="Judge score, round by round (95% intervals)")
        by_kl = plot_panels([{"y_label": score, "points": [_point("initial", 0.0, None, initial)]
                              + [_point(f"round {r['round']}", r["kl_to_initial"]["mean"], r["kl_to_initial"], r["judge_score"])
                                 for r in rounds]}],
                            plots / "judge_kl.png", xlabel="KL(policy || initial), nats per completion",
                            title="Judge score against KL (95% intervals)")
        body += ["<h2>Judge score by round and against KL</h2>",
                 f'<div class="row">{image(by_round, "judge score by round")}{image(by_kl, "judge score against KL")}</div>']
        samples = [(s["prompt"], s["policy"], s["initial"]) for s in summary.get("samples") or []]
        if samples:
            body.append(table(f"Samples of round {rounds[-1]['round']} (held-out prompts)", samples,
                              ("prompt", "policy", "initial model"), pre=True))
    body.append("<p>Each round is a run folder of its own (round-N/report.html: its training curves).</p>")
    path = folder / "report.html"
    path.write_text(page(f"preftune iterate: {folder.resolve().name}", "\n".join(body)), encoding="utf-8")
    return path

"""Reports over several runs: the rounds of `preftune iterate` side by side, and the policies of a
`preftune dpo --sweep` on one reward-against-KL frontier.

Both pages are built with :mod:`preftune.report.html`'s toolkit (one style sheet, escaped cells,
embedded images) and :func:`preftune.report.plots.plot_frontier`. :func:`write_any` is what
`preftune report FOLDER` calls: an iteration folder (``iterate.json``), a sweep folder
(``sweep.json``) or a single run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError
from preftune.report.html import _f, image, page, read_evals, reward_axis, table, write_report
from preftune.report.plots import plot_frontier


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
    if not entry or entry.get("mean") is None:
        return "n/a"
    return f"{_f(entry['mean'])} ± {_f(entry.get('stderr'))}"


def _win(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "n/a"
    low, high = entry["ci95"]
    return f"{_f(entry['win_rate'])} [{_f(low)}, {_f(high)}]"


# --------------------------------------------------------------------------- iterate
def iteration_rows(summary: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per round (round 0: the initial model): the numbers the report and the CLI show."""
    rows = [("0 (initial)", _pm(summary["initial"]["judge_score"]), "-", "0", "-", "-", "-")]
    for r in summary["rounds"]:
        pairing = r.get("pairing") or {}
        rows.append((str(r["round"]), _pm(r["judge_score"]), _win(r.get("win_rate_vs_initial")), _pm(r.get("kl_to_initial")),
                     f"{pairing.get('pairs', '?')} ({pairing.get('ties', '?')} ties dropped)",
                     _pm(pairing.get("sample_score")), _f(r.get("steps"))))
    return rows


ITERATION_HEADER = ("round", "judge score (held-out)", "win rate vs initial [95% CI]", "KL to initial (nats)",
                    "pairs trained on", "judge score of training samples", "DPO steps")


def format_iteration(summary: dict[str, Any]) -> str:
    """The rounds as aligned text for a terminal."""
    rows = [ITERATION_HEADER, *iteration_rows(summary)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(ITERATION_HEADER))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def write_iteration_report(folder: str | Path) -> Path:
    """``folder/report.html``: the rounds side by side, the judge's score per round, and score against KL."""
    folder = Path(folder)
    summary = _load(folder / "iterate.json")
    plots = folder / "plots"
    plots.mkdir(exist_ok=True)
    initial = summary["initial"]["judge_score"]["mean"]
    rounds = summary["rounds"]
    body = [f"<h1>preftune iterate: {folder.resolve().name}</h1>",
            f"<p>{len(rounds)} of {summary['rounds_planned']} rounds done; judged by {summary['judge']}; "
            "held-out prompts, temperature-1 samples.</p>",
            table("Rounds", iteration_rows(summary), ITERATION_HEADER)]
    if rounds:
        by_round = plot_frontier([(0.0, initial, "initial")] + [(r["round"], r["judge_score"]["mean"], f"round {r['round']}")
                                                                for r in rounds],
                                 plots / "judge_by_round.png", xlabel="round", ylabel="judge score (held-out)",
                                 title="Judge score, round by round")
        by_kl = plot_frontier([(r["kl_to_initial"]["mean"], r["judge_score"]["mean"], f"round {r['round']}") for r in rounds],
                              plots / "judge_kl.png", xerr=[r["kl_to_initial"]["stderr"] or 0.0 for r in rounds],
                              xlabel="KL(policy || initial), nats per completion", ylabel="judge score (held-out)",
                              title="Judge score against KL", label="rounds", baseline=(0.0, initial, "initial model"))
        body += [image(by_round, "judge score by round"), image(by_kl, "judge score against KL")]
        samples = [(s["prompt"], s["policy"], s["initial"]) for s in summary.get("samples") or []]
        if samples:
            body.append(table(f"Samples of round {rounds[-1]['round']} (held-out prompts)", samples,
                              ("prompt", "policy", "initial model"), pre=True))
    body.append("<p>Each round is a run folder of its own (round-N/report.html: its training curves).</p>")
    path = folder / "report.html"
    path.write_text(page(f"preftune iterate: {folder.resolve().name}", "\n".join(body)), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- sweeps
def sweep_points(folder: Path) -> tuple[list[dict[str, Any]], str | None, list[float]]:
    """The sweep's runs with their main evaluation (``eval.json``), the reward measure, its values."""
    summary = _load(folder / "sweep.json")
    runs = []
    for run in summary["runs"]:
        evals = [e for e in read_evals(folder / run["folder"]) if e["file"] == "eval.json"] if (folder / run["folder"]).is_dir() else []
        runs.append({**run, "eval": evals[0] if evals else None})
    measured = [r for r in runs if r["eval"] and (r["eval"].get("kl") or {}).get("mean") is not None]
    axis = reward_axis([r["eval"] for r in measured]) if measured else None
    return runs, axis[0] if axis else None, axis[1] if axis else []


def write_sweep_report(folder: str | Path) -> Path:
    """``folder/report.html``: one row per swept value, and the reward-against-KL frontier."""
    folder = Path(folder)
    summary = _load(folder / "sweep.json")
    runs, label, rewards = sweep_points(folder)
    measured = [r for r in runs if r["eval"] and (r["eval"].get("kl") or {}).get("mean") is not None]
    rows = []
    for r in runs:
        ev = r["eval"] or {}
        pref = ev.get("preference") or {}
        rows.append((r["label"], r["folder"], _pm(ev.get("kl")), _f(pref.get("rewards/margins")), _f(pref.get("rewards/accuracies")),
                     _f(r.get("reference_warm"))))
    body = [f"<h1>preftune sweep: {folder.resolve().name}</h1>",
            f"<p>Swept: {', '.join(summary['swept'])}. Reference log-probs computed {summary['reference_passes']} time(s) "
            "for all runs (on-disk cache).</p>",
            table("Runs", rows, ("value", "folder", "KL to reference", "held-out reward margin", "held-out reward accuracy",
                                 "reference read from cache"))]
    if label and len(measured) > 1:
        plots = folder / "plots"
        plots.mkdir(exist_ok=True)
        points = sorted(zip((r["eval"]["kl"]["mean"] for r in measured), rewards, (r["label"] for r in measured)))
        path = plot_frontier(list(points), plots / "frontier.png", xlabel="KL(policy || reference), nats per completion",
                             ylabel=label, title="Reward against KL, one point per swept value", label="sweep")
        body.append(image(path, "reward against KL"))
    elif not measured:
        body.append("<p>No run was evaluated (no held-out data): no frontier to draw.</p>")
    path = folder / "report.html"
    path.write_text(page(f"preftune sweep: {folder.resolve().name}", "\n".join(body)), encoding="utf-8")
    return path

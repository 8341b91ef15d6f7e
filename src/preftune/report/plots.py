"""Every plot the project draws, each written as a PNG: a run's training curves, the alignment
histogram, win rates with their intervals, reward against KL (per checkpoint in a run's
report, per beta in the demo), and a sweep's frontier panels with intervals on both axes.

Plots use matplotlib's object API on an Agg canvas (no global figure state, no backend switch): a figure
comes from :func:`_figure` and is written by :func:`_save`. Like :mod:`preftune.report.html`, this
is a low layer: it imports nothing of the project.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

#: (file stem, title, metric names): a plot is drawn when any of its names was logged.
CURVES = (
    ("loss", "Loss", ("loss",)),
    ("rewards", "Rewards of chosen and rejected", ("rewards/chosen", "rewards/rejected")),
    ("margins", "Reward margin", ("rewards/margins", "margin")),
    ("accuracies", "Reward accuracy", ("rewards/accuracies", "accuracy")),
    ("logps", "Log-probs of chosen and rejected (policy)", ("logps/chosen", "logps/rejected")),
)


def _figure(width: float = 6.4, height: float = 3.6) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return figure, figure.add_subplot()


def _save(figure: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    figure.savefig(path, format="png")
    return path


def is_number(value: Any) -> bool:
    """True for a finite int or float (not a bool): a value that can be plotted."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_curves(metrics: list[dict[str, Any]], plots: Path) -> list[tuple[str, Path]]:
    """One PNG per group of :data:`CURVES` that was logged: train lines, eval points over them."""
    out = []
    for stem, title, names in CURVES:
        present = [n for n in names if any(n in m for m in metrics) or any(f"eval/{n}" in m for m in metrics)]
        if not present:
            continue
        figure, ax = _figure()
        for name in present:
            train = [(m["step"], m[name]) for m in metrics if name in m and is_number(m[name])]
            evals = [(m["step"], m[f"eval/{name}"]) for m in metrics if f"eval/{name}" in m and is_number(m[f"eval/{name}"])]
            if train:
                line, = ax.plot(*zip(*train), label=f"train {name}")
                color = line.get_color()
            else:
                color = None
            if evals:
                ax.plot(*zip(*evals), "o--", color=color, label=f"eval {name}", markersize=5)
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        out.append((title, _save(figure, plots / f"{stem}.png")))
    return out


def plot_alignment(result: dict[str, Any], path: Path) -> Path:
    """Histogram of per-pair (policy log-ratio - reference log-ratio)."""
    differences = result["preference"]["alignment/differences"]
    figure, ax = _figure()
    ax.hist(differences, bins=min(40, max(5, len(differences) // 3)), color="#4c72b0")
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set_xlabel("log-ratio gain over the reference (nats): > 0 means the policy moved towards chosen")
    ax.set_ylabel("pairs")
    ax.set_title(f"Alignment check: {result['preference']['alignment/improved']:.1%} of pairs improved")
    return _save(figure, path)


def plot_win_rates(result: dict[str, Any], path: Path) -> Path:
    """Win rate of each judge with its 95% interval; 0.5 is a draw."""
    rates = result["win_rate"]
    figure, ax = _figure(height=1.2 + 0.6 * len(rates))
    for k, wr in enumerate(rates):
        low, high = wr["ci95"]
        ax.errorbar([wr["win_rate"]], [k], xerr=[[wr["win_rate"] - low], [high - wr["win_rate"]]], fmt="o", capsize=6)
    ax.set_yticks(range(len(rates)), [wr["judge"][:40] for wr in rates])
    ax.axvline(0.5, color="grey", linestyle=":")
    ax.set_xlim(0, 1)
    ax.set_xlabel("policy win rate against the reference (95% interval)")
    return _save(figure, path)


def plot_frontier(points: list[tuple[float, float, str]], path: Path, *, xlabel: str, ylabel: str, title: str,
                  xerr: list[float] | None = None, label: str | None = None,
                  baseline: tuple[float, float, str] | None = None, width: float = 6.4, height: float = 3.6) -> Path:
    """Labelled points ``(x, y, text)`` joined in the order given (e.g. reward against KL, one point
    per checkpoint or per beta), with optional horizontal error bars, a legend ``label`` for the
    line, and a ``baseline`` point ``(x, y, legend label)`` drawn apart in grey."""
    figure, ax = _figure(width, height)
    xs, ys = [x for x, _, _ in points], [y for _, y, _ in points]
    if xerr is None:
        ax.plot(xs, ys, "o-", color="tab:blue", label=label)
    else:
        ax.errorbar(xs, ys, xerr=xerr, fmt="o-", capsize=4, color="tab:blue", label=label)
    for x, y, text in points:
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small")
    if baseline is not None:
        ax.scatter([baseline[0]], [baseline[1]], color="tab:gray", label=baseline[2])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if label is not None or baseline is not None:
        ax.legend(fontsize="small")
    return _save(figure, path)


def plot_panels(panels: list[dict[str, Any]], path: Path, *, xlabel: str, title: str) -> Path:
    """Side by side, one axis per panel: its ``points`` (``label``, ``x``, ``x_ci``, ``y``, ``y_ci``; intervals
    may be None) joined in the order given, each with its 95% intervals as error bars, ``y_label`` on the y axis."""
    figure = _figure(6.4 * min(len(panels), 2), 3.8)[0]
    figure.clear()
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        points = panel["points"]
        xs, ys = [p["x"] for p in points], [p["y"] for p in points]
        ax.errorbar(xs, ys, xerr=_errors(points, "x"), yerr=_errors(points, "y"), fmt="o-", capsize=4, color="tab:blue")
        for point in points:
            ax.annotate(point["label"], (point["x"], point["y"]), textcoords="offset points", xytext=(4, 4), fontsize="small")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(panel["y_label"])
        ax.grid(alpha=0.3)
    figure.suptitle(title)
    return _save(figure, path)


def _errors(points: list[dict[str, Any]], axis: str) -> list[list[float]]:
    """Error bar lengths below and above each point from its interval (none: 0; rounding never makes one negative)."""
    below = [max(0.0, p[axis] - p[f"{axis}_ci"][0]) if p[f"{axis}_ci"] else 0.0 for p in points]
    above = [max(0.0, p[f"{axis}_ci"][1] - p[axis]) if p[f"{axis}_ci"] else 0.0 for p in points]
    return [below, above]


def plot_reward_kl(evals: list[dict[str, Any]], label: str, rewards: list[float], path: Path) -> Path:
    """One point per evaluated checkpoint: KL to the reference (with its standard error) against reward."""
    return plot_frontier([(r["kl"]["mean"], y, str(r["checkpoint"])) for r, y in zip(evals, rewards)], path,
                         xerr=[r["kl"]["stderr"] or 0.0 for r in evals], xlabel="KL(policy || reference), nats per completion",
                         ylabel=label, title="Reward against KL, per evaluated checkpoint")

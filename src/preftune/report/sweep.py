"""The report of `preftune dpo --sweep`: one row per swept value, and a frontier against KL that
compares like with like.

Each point is one swept policy: x is its KL to the reference (nats per sampled completion, with the
95% interval from the samples' standard error), y is, with its 95% interval:

- with a judge (``sweep.judge``, ``sweep.reward_model``): for each judge, its win rate of the
  policy's samples against the reference's (Wilson interval), or for a reward model the mean
  reward of the policy's samples (normal interval). These do not depend on beta.
- without one: the held-out log-ratio margin, ``(log pi/ref)(chosen) - (log pi/ref)(rejected)``
  in nats (the implicit reward margin divided by beta; normal interval over the pairs), and the
  held-out accuracy (the share of pairs ranked right; a sign, the same for every beta; Wilson
  interval), each labelled as not a reward.

Never the implicit reward margin itself: it is beta times the log-ratio margin, so a larger beta
shows a larger "reward" by construction. The panels' data is written to ``plots/frontier.json``
(what the PNG shows, for a reader or a test), the figure to ``plots/frontier.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError
from preftune.report.html import accuracy, escape, image, logratio_margin, page, read_evals, table
from preftune.report.plots import plot_panels
from preftune.report.runinfo import data_counts, precision_text, read_json
from preftune.report.text import listing, number, share_interval, value_interval
from preftune.stats import stderr_interval

#: the y quantities of the frontier without a judge: (key, axis label)
BETA_FREE = (("logratio_margin", "held-out log-ratio margin, nats\n(reward margin / beta: not a reward)"),
             ("accuracy", "held-out preference accuracy\n(not a reward)"))


def short_judge(name: str) -> str:
    """A judge's name short enough for a column or an axis: ``function /a/b/judges.py:better`` -> ``judges.py:better``,
    ``reward model /runs/rm/final`` -> ``reward model rm/final`` (the sentence above the table names it in full)."""
    kind, _, where = name.partition(" ") if name.startswith("function ") else ("reward model", "", name.removeprefix("reward model "))
    if kind == "function":
        file, colon, function = where.rpartition(":")
        return f"{Path(file).name}{colon}{function}" if colon else where
    return f"reward model {'/'.join(Path(where).parts[-2:])}"


def _load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PreftuneError(f"{path}: cannot be read as JSON ({err}).") from None


def sweep_points(folder: Path) -> list[dict[str, Any]]:
    """The sweep's runs (``sweep.json``), each with its main evaluation (``eval.json``) under ``eval``, None when not evaluated."""
    runs = []
    for run in _load(folder / "sweep.json")["runs"]:
        evals = [e for e in read_evals(folder / run["folder"]) if e["file"] == "eval.json"] if (folder / run["folder"]).is_dir() else []
        runs.append({**run, "eval": evals[0] if evals else None})
    return runs


def _measures(ev: dict[str, Any]) -> dict[str, tuple[float, Any]]:
    """Every y quantity one evaluation offers, as (value, 95% interval), keyed as the panels are."""
    out: dict[str, tuple[float, Any]] = {}
    pref = ev.get("preference")
    if pref:
        out["logratio_margin"], out["accuracy"] = logratio_margin(pref), accuracy(pref)
    for wr in ev.get("win_rate") or []:
        if "reward_policy" in wr:
            out[f"reward:{wr['judge']}"] = (wr["reward_policy"], wr.get("reward_policy_ci95"))
        else:
            out[f"win:{wr['judge']}"] = (wr["win_rate"], wr["ci95"])
    return out


def frontier_panels(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The panels the frontier draws (see the module docstring): the judges' when every evaluated run
    was judged, else the beta-free pair; each ``{"quantity", "y_label", "points": [{"label", "x", "x_ci", "y", "y_ci"}]}``."""
    measured = [r for r in runs if r["eval"] and (r["eval"].get("kl") or {}).get("mean") is not None]
    if len(measured) < 2:
        return []
    offered = [_measures(r["eval"]) for r in measured]
    common = [key for key in offered[0] if all(key in m for m in offered)]
    judged = [key for key in common if key.startswith(("win:", "reward:"))]
    labels = dict(BETA_FREE)
    keys = judged or [key for key, _ in BETA_FREE if key in common]
    panels = []
    for key in keys:
        kind, _, judge = key.partition(":")
        y_label = labels.get(key) or (f"mean reward of the policy's samples\n({short_judge(judge)})" if kind == "reward"
                                      else f"win rate against the reference\n({short_judge(judge)})")
        points = sorted(({"label": r["label"], "x": r["eval"]["kl"]["mean"],
                          "x_ci": stderr_interval(r["eval"]["kl"]["mean"], r["eval"]["kl"].get("stderr")),
                          "y": m[key][0], "y_ci": list(m[key][1]) if m[key][1] else None} for r, m in zip(measured, offered)),
                        key=lambda p: p["x"])
        panels.append({"quantity": key, "y_label": y_label, "points": points})
    return panels


def _row(run: dict[str, Any], judges: list[str], status: dict[str, Any]) -> tuple[str, ...]:
    ev = run["eval"] or {}
    pref, kl = ev.get("preference"), ev.get("kl") or {}
    wins = {wr["judge"]: wr for wr in ev.get("win_rate") or []}
    judged = []
    for name in judges:
        wr = wins.get(name)
        judged.append("n/a" if wr is None else share_interval(wr["win_rate"], wr["ci95"])
                      + (f"; reward {value_interval(wr['reward_policy'], wr.get('reward_policy_ci95'))}" if "reward_policy" in wr else ""))
    return (run["label"], value_interval(kl.get("mean"), stderr_interval(kl.get("mean"), kl.get("stderr"))),
            value_interval(*logratio_margin(pref)) if pref else "n/a", share_interval(*accuracy(pref)) if pref else "n/a",
            *judged, number(status.get("seconds")), run["folder"])


def _header(folder: Path, summary: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    first = folder / runs[0]["folder"] if runs else folder
    config = _yaml(first / "config.yaml")
    status = read_json(first / "status.json")
    model = (config.get("model") or {}).get("path", "an unrecorded model")
    ev = next((r["eval"] for r in runs if r["eval"]), {})
    pairs, kl = (ev.get("preference") or {}).get("pairs"), ev.get("kl") or {}
    judge = summary.get("judge")
    times = listing([(r["label"], read_json(folder / r["folder"] / "status.json").get("seconds")) for r in runs], " s")
    loss = (config.get("loss") or {}).get("name", "?")
    return (f"{len(runs)} runs of preference tuning (loss {loss}) from {model}, swept over {', '.join(summary['swept'])}; "
            f"training times: {times}. Data: {data_counts(read_json(first / 'data_report.json'))}. "
            f"Each policy evaluated on {number(pairs)} held-out pairs and {number(kl.get('n'))} sampled completions "
            f"({number(kl.get('prompts'))} prompts, temperature 1). "
            + (f"Judged against the reference's samples by {judge}. " if judge else
               "No judge was given (sweep.judge or sweep.reward_model): the frontier shows the log-ratio margin and the accuracy, "
               "which do not grow with beta but are not rewards. ")
            + f"Reference log-probs computed {summary['reference_passes']} time(s) for all runs (on-disk cache). "
            f"Precision: {precision_text(status)}. Processor: {status.get('processor') or 'not recorded'}.")


def _yaml(path: Path) -> dict[str, Any]:
    from preftune.config.yamlfile import read_yaml

    return read_yaml(path, "the run's config.yaml") if path.is_file() else {}


def write_sweep_report(folder: str | Path) -> Path:
    """``folder/report.html``: the sweep in sentences, one row per swept value, and the frontier against KL."""
    folder = Path(folder)
    summary = _load(folder / "sweep.json")
    runs = sweep_points(folder)
    judges = list(dict.fromkeys(wr["judge"] for r in runs if r["eval"] for wr in r["eval"].get("win_rate") or []))
    header = ("value", "KL to reference (nats)", "log-ratio margin (nats)", "held-out accuracy",
              *(f"win rate against the reference ({short_judge(j)})" for j in judges), "training time (s)", "folder")
    rows = [_row(r, judges, read_json(folder / r["folder"] / "status.json")) for r in runs]
    body = [f"<h1>preftune sweep: {escape(folder.resolve().name)}</h1>", f"<p>{escape(_header(folder, summary, runs))}</p>",
            table("Runs (95% intervals in brackets)", rows, header)]
    plots = folder / "plots"
    (plots / "frontier.png").unlink(missing_ok=True)
    (plots / "frontier.json").unlink(missing_ok=True)
    panels = frontier_panels(runs)
    if panels:
        plots.mkdir(exist_ok=True)
        (plots / "frontier.json").write_text(json.dumps({"x": "KL(policy || reference), nats per completion", "panels": panels}, indent=1),
                                             encoding="utf-8")
        title = "Judge's score against KL" if judges else "Beta-free measures against KL (no judge given: not rewards)"
        path = plot_panels(panels, plots / "frontier.png", xlabel="KL(policy || reference), nats per completion",
                           title=f"{title}, one point per swept value, 95% intervals")
        body += [f"<h2>{escape(title)}</h2>", image(path, title)]
    elif not any(r["eval"] for r in runs):
        body.append("<p>No run was evaluated (no held-out data): no frontier to draw.</p>")
    path = folder / "report.html"
    path.write_text(page(f"preftune sweep: {folder.resolve().name}", "\n".join(body)), encoding="utf-8")
    return path

"""How results are shown: the terminal table of an evaluation, a run's HTML report, and the
HTML toolkit every page of the project uses (:func:`page` with the one style sheet,
:func:`table`, :func:`image`, :func:`escape`); the plots themselves are :mod:`preftune.report.plots`.

``write_report(RUN_DIR)`` writes ``RUN_DIR/report.html``, one self-contained file (plots
embedded as base64 PNG data URIs, inline CSS, no script), and the plots as ``RUN_DIR/plots/*.png``:

- a header: what ran (stage, loss, model), how long, on how much data, in which precision and
  on which processor (``config.yaml``, ``status.json``, ``data_report.json``), as sentences;
- training curves from ``metrics.jsonl`` (loss; rewards of chosen and rejected; margins;
  accuracy; log-probs), with the ``eval/...`` points drawn over them;
- the run's config and ``data_report.json`` summaries;
- evaluation results: every ``eval.json`` / ``eval-LABEL.json`` in the run folder (written by
  :func:`preftune.eval.run.run_eval`, one per evaluated checkpoint, each labelled by its
  ``checkpoint`` and ``step``). The main one (``eval.json``, else the latest step) gets full
  tables, the histogram of per-pair log-ratio gains and the win rates with their intervals;
  with two or more, a table of all of them and reward against KL, one point per checkpoint.

Every result is an HTML table (numbers right-aligned, intervals as ``87.6% [84, 90]``, written by
:mod:`preftune.report.text`); no dict or list literal is ever shown. Whatever is missing (no eval
yet, no data report, an SFT run without rewards) is left out; the report always renders. Every
string shown is escaped here. A low layer: of the project, only :mod:`preftune.errors`,
:mod:`preftune.config.yamlfile` and the other modules of :mod:`preftune.report` are imported.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError
from preftune.report.plots import (
    CURVES,
    plot_alignment,
    plot_curves,
    plot_reward_kl,
    plot_win_rates,
)
from preftune.report.runinfo import read_json, run_sentences
from preftune.report.text import is_numeric, number, percent, prompt_text, share_interval, value_interval
from preftune.stats import mean_interval, stderr_interval, wilson_interval

#: every PNG the report writes into plots/
PLOT_NAMES = tuple(stem for stem, _, _ in CURVES) + ("alignment", "win_rate", "reward_kl")


# --------------------------------------------------------------------------- tables
def result_rows(results: dict[str, Any]) -> list[tuple[str, list[tuple[str, str]]]]:
    """An evaluation's results as titled sections of (name, formatted value) rows."""
    sections = []
    pref = results.get("preference")
    if pref:
        q = pref.get("alignment/quantiles", {})
        sections.append((f"Preference ({pref['pairs']} held-out pairs, beta {pref['beta']:g})", [
            ("reward accuracy (95% Wilson interval)", accuracy_text(pref)),
            ("log-ratio margin = reward margin / beta (nats, 95% interval)", value_interval(*logratio_margin(pref))),
            ("reward margin (mean)", _f(pref["rewards/margins"])),
            ("reward chosen / rejected", f"{_f(pref['rewards/chosen'])} / {_f(pref['rewards/rejected'])}"),
            ("log-ratio gained over reference", f"{_pct(pref['alignment/improved'])} of pairs ({_pct(pref['alignment/unchanged'])} unchanged)"),
            ("log-ratio gain p5 / p50 / p95 (nats)", " / ".join(_f(q.get(k)) for k in ("p5", "p50", "p95"))),
            ("prefers chosen: policy / reference", f"{_f(pref['logratio/policy_accuracy'])} / {_f(pref['logratio/reference_accuracy'])}"),
            ("perplexity of chosen: policy / reference", f"{_f(pref['perplexity/chosen'])} / {_f(pref['reference/perplexity/chosen'])}"),
        ]))
    ppl = results.get("perplexity")
    if ppl:
        sections.append((f"Perplexity ({ppl['policy']['texts']} held-out texts, {ppl['policy']['tokens']} tokens)", [
            ("policy", _f(ppl["policy"]["perplexity"])), ("reference", _f(ppl["reference"]["perplexity"]))]))
    kl = results.get("kl")
    if kl:
        sections.append(("KL(policy || reference)", [
            ("KL per completion (nats, 95% interval)", value_interval(kl["mean"], stderr_interval(kl["mean"], kl["stderr"]))),
            ("samples", f"{kl['n']} ({kl.get('prompts', '?')} prompts), {_f(kl['mean_tokens'])} tokens on average, "
                        f"{_pct(kl['finished'])} ended with EOS"),
        ]))
    for wr in results.get("win_rate") or []:
        rows = [
            (f"win rate, ties count half (95% {wr['interval'].capitalize()} interval)", share_interval(wr["win_rate"], wr["ci95"])),
            ("wins / losses / ties (n)", f"{wr['wins']} / {wr['losses']} / {wr['ties']} ({wr['n']})"),
            ("mean length policy / reference (chars)", f"{_f(wr['mean_len_policy'])} / {_f(wr['mean_len_reference'])}"),
            ("longer response won", _f(wr.get("longer_wins"))),
        ]
        if "reward_policy" in wr:
            rows.append(("mean reward policy [95% interval] / reference",
                         f"{value_interval(wr['reward_policy'], wr.get('reward_policy_ci95'))} / {_f(wr['reward_reference'])}"))
        sections.append((f"Win rate, judged by {wr['judge']}", rows))
    return sections


def format_table(results: dict[str, Any]) -> str:
    """An evaluation's results as aligned text for a terminal."""
    step = f", step {results['step']}" if results.get("step") is not None else ""
    lines = [f"policy {results.get('policy')} ({results.get('checkpoint')}{step}) vs reference {results.get('reference')}"]
    sections = result_rows(results)
    width = max((len(name) for _, rows in sections for name, _ in rows), default=0)
    for title, rows in sections:
        lines.append("")
        lines.append(title)
        lines.extend(f"  {name:<{width}}  {value}" for name, value in rows)
    if not sections:
        lines.append("(nothing evaluated: give held-out pairs, prompts or texts)")
    if results.get("path"):
        lines.append("")
        lines.append(f"saved to {results['path']}")
    return "\n".join(lines)


_f, _pct = number, percent  # the short names the tables below use


def accuracy_text(pref: dict[str, Any]) -> str:
    """Held-out reward accuracy with its Wilson interval over the pairs: ``87.6% [84, 90]``."""
    return share_interval(*accuracy(pref))


def accuracy(pref: dict[str, Any]) -> tuple[float, tuple[float, float] | None]:
    """Held-out reward accuracy (the share of pairs with a positive margin; the same for every beta) and its Wilson interval."""
    value, n = pref["rewards/accuracies"], pref.get("pairs") or 0
    return value, wilson_interval(value * n, n) if n and not math.isnan(value) else None


def logratio_margin(pref: dict[str, Any]) -> tuple[float, tuple[float, float] | None]:
    """The mean log-ratio margin of the held-out pairs, ``(log pi/ref)(chosen) - (log pi/ref)(rejected)``, which is the
    implicit reward margin divided by beta (so it does not grow with beta), and its 95% interval over the pairs."""
    differences = pref.get("alignment/differences")
    if differences:
        return mean_interval(differences)
    return pref.get("alignment/mean", pref["rewards/margins"] / pref["beta"]), None


# --------------------------------------------------------------------------- reading a run
def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The lines of ``metrics.jsonl`` (empty when there is none)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise PreftuneError(f"{path}, line {line_number}: not JSON ({err.msg}).") from None
    return records


def read_evals(run_dir: Path) -> list[dict[str, Any]]:
    """``eval.json`` and every ``eval-LABEL.json`` in the run folder, ordered by step (unknown steps last)."""
    evals = []
    for path in sorted([*run_dir.glob("eval.json"), *run_dir.glob("eval-*.json")]):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise PreftuneError(f"{path}: not JSON ({err.msg}).") from None
        if isinstance(result, dict):
            result.setdefault("checkpoint", path.stem.removeprefix("eval-") if path.stem != "eval" else "final")
            result["file"] = path.name
            evals.append(result)
    return sorted(evals, key=lambda r: (r.get("step") is None, r.get("step") or 0, r["file"]))


# --------------------------------------------------------------------------- what reward-KL shows
def reward_axis(evals: list[dict[str, Any]]) -> tuple[str, list[float]] | None:
    """The y values of the reward-KL plot: the first measure every result has, in this order:
    reward-model reward of the policy's samples, win rate, held-out implicit reward margin."""
    measures = (
        ("reward of policy samples (reward model)", lambda r: next(w["reward_policy"] for w in r["win_rate"] if "reward_policy" in w)),
        ("win rate against the reference", lambda r: r["win_rate"][0]["win_rate"]),
        ("implicit reward margin on held-out pairs", lambda r: r["preference"]["rewards/margins"]),
    )
    for label, get in measures:
        try:
            return label, [float(get(r)) for r in evals]
        except (KeyError, IndexError, StopIteration, TypeError):
            continue
    return None


# --------------------------------------------------------------------------- the report
def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` and ``run_dir/plots/*.png``; return the HTML's path."""
    from preftune.config.yamlfile import read_yaml

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PreftuneError(f"'{run_dir}' is not a run folder.")
    if not any((run_dir / name).is_file() for name in ("config.yaml", "metrics.jsonl")) and not any(run_dir.glob("eval*.json")):
        raise PreftuneError(f"'{run_dir}' is not a run folder (it holds no config.yaml, metrics.jsonl or eval*.json).")
    metrics = read_metrics(run_dir)
    config = read_yaml(run_dir / "config.yaml", "the run's config.yaml") if (run_dir / "config.yaml").is_file() else {}
    data_report = read_json(run_dir / "data_report.json")
    evals = read_evals(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    for stem in PLOT_NAMES:  # a plot of ours that no longer applies must not linger
        (plots / f"{stem}.png").unlink(missing_ok=True)

    status = read_json(run_dir / "status.json")
    body = [f"<h1>preftune run: {escape(run_dir.resolve().name)}</h1>", f"<p>{escape(run_sentences(config, metrics, data_report, status))}</p>",
            _settings_table(config)]
    body.append("<h2>Training</h2>")
    curves = plot_curves(metrics, plots)
    body.extend(image(path, title) for title, path in curves)
    if not curves:
        body.append("<p>No training metrics (metrics.jsonl) yet.</p>")
    body.append(_last_metrics(metrics))
    if data_report:
        body.append(_data_table(data_report))
    body.append("<h2>Evaluation</h2>")
    if not evals:
        body.append("<p>Not evaluated yet: run <code>preftune eval</code> on this run folder.</p>")
    else:
        main = next((r for r in evals if r["file"] == "eval.json"), evals[-1])
        body.append(f"<p>Main result: <code>{escape(main['file'])}</code> (checkpoint {escape(main['checkpoint'])}"
                    f"{'' if main.get('step') is None else ', step ' + escape(main['step'])}).</p>")
        for title, rows in result_rows(main):
            body.append(table(title, rows))
        if (main.get("preference") or {}).get("alignment/differences"):
            body.append(image(plot_alignment(main, plots / "alignment.png"), "alignment histogram"))
        if main.get("win_rate"):
            body.append(image(plot_win_rates(main, plots / "win_rate.png"), "win rates"))
        body.append(_samples(main))
        with_kl = [r for r in evals if (r.get("kl") or {}).get("mean") is not None]
        if len(evals) > 1:
            body.append(_checkpoint_table(evals))
        axis = reward_axis(with_kl) if len(with_kl) > 1 else None
        if axis is not None:
            body.append(image(plot_reward_kl(with_kl, axis[0], axis[1], plots / "reward_kl.png"), "reward against KL"))
    path = run_dir / "report.html"
    path.write_text(page(f"preftune report: {run_dir.resolve().name}", "\n".join(body)), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- HTML
#: the one style sheet of every page the project writes (run reports, the demo's report)
_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
    "table{border-collapse:collapse;margin:0.5rem 0 1.5rem}td,th{border:1px solid #ccc;padding:0.25rem 0.6rem;text-align:left;vertical-align:top}"
    "td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}"
    "th{background:#f3f3f3}caption{text-align:left;font-weight:600;padding:0.3rem 0}img{max-width:100%;display:block;margin:0.5rem 0 1rem}"
    "pre{white-space:pre-wrap;margin:0;font-size:0.85rem}code{background:#f3f3f3;padding:0 0.2rem}"
    ".row img{display:inline-block;max-width:49%;margin:0.5rem 1% 1rem 0}"
)


def page(title: str, body_html: str) -> str:
    """A whole self-contained HTML page: ``title`` (escaped here) and ``body_html`` (already HTML)
    under the project's one style sheet."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body_html}\n</body>\n</html>\n"
    )


def escape(value: Any) -> str:
    """``value`` as text safe inside HTML (elements and quoted attributes)."""
    return html.escape(str(value))


def image(path: Path, alt: str) -> str:
    """The PNG at ``path`` embedded as a data URI, with ``alt`` (escaped) as its text."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{escape(alt)}">'


def images_row(images: list[str]) -> str:
    """:func:`image` tags side by side, two to a line."""
    return f'<div class="row">{"".join(images)}</div>'


def table(title: str | None, rows: list[tuple[Any, ...]], header: tuple[str, ...] | None = None, *, pre: bool = False) -> str:
    """A table of escaped cells: ``title`` as its caption (none when None), ``header`` as its first
    row; a cell that reads as a number (:func:`preftune.report.text.is_numeric`) is right-aligned in tabular
    figures; with ``pre``, each cell keeps its line breaks and spaces."""
    caption = "" if title is None else f"<caption>{escape(title)}</caption>"
    head = "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>" if header else ""
    def cell(value: Any) -> str:
        text = escape(value)
        if pre:
            return f"<td><pre>{text}</pre></td>"
        return f'<td class="num">{text}</td>' if is_numeric(str(value)) else f"<td>{text}</td>"

    cells = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table>{caption}{head}{cells}</table>"


# --------------------------------------------------------------------------- the report's parts
def _settings_table(config: dict[str, Any]) -> str:
    rows = []
    for section, key in (("model", "path"), ("reference", "strategy"), ("reference", "path"), ("loss", "name"), ("loss", "beta"),
                         ("train", "lr"), ("train", "batch_size"), ("train", "grad_accum"), ("train", "max_steps"), ("train", "seed")):
        value = (config.get(section) or {}).get(key) if isinstance(config.get(section), dict) else None
        if value is not None:
            rows.append((f"{section}.{key}", _f(value)))
    return table("Settings (config.yaml)", rows, ("setting", "value")) if rows else "<p>No config.yaml in this folder.</p>"


def _last_metrics(metrics: list[dict[str, Any]]) -> str:
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if any(k.startswith("eval/") for k in m)]
    out = []
    last = (("Last logged training step", train[-1] if train else None), ("Last evaluation during training", evals[-1] if evals else None))
    for title, line in last:
        if line:
            out.append(table(f"{title} (step {line.get('step')})", [(k, _f(v)) for k, v in line.items() if k != "step"]))
    return "\n".join(out)


def _data_table(report: dict[str, Any]) -> str:
    rows = []
    for split, r in report.items():
        if not isinstance(r, dict):
            continue
        dropped = ", ".join(f"{k}: {v}" for k, v in (r.get("dropped") or {}).items()) or "none"
        cut = ", ".join(f"{k}: {v}" for k, v in (r.get("truncation") or {}).items() if v) or "none"
        full = (r.get("tokens") or {}).get("full") or {}
        lengths = " / ".join(str(full.get(k, "?")) for k in ("p50", "p90", "max")) if full else "n/a"
        rows.append((split, ", ".join(map(str, r.get("files") or [])), r.get("format", ""), r.get("records", ""), r.get("kept", ""),
                     dropped, cut, lengths))
    return table("Data (data_report.json)", rows, ("split", "files", "format", "records", "kept", "dropped", "cut", "tokens p50/p90/max"))


def _checkpoint_table(evals: list[dict[str, Any]]) -> str:
    rows = []
    for r in evals:
        kl, pref, wins = r.get("kl") or {}, r.get("preference") or {}, r.get("win_rate") or []
        rows.append((r["checkpoint"], _f(r.get("step")), value_interval(kl.get("mean"), stderr_interval(kl.get("mean"), kl.get("stderr"))),
                     accuracy_text(pref) if pref else "n/a", _pct(pref.get("alignment/improved")),
                     share_interval(wins[0]["win_rate"], wins[0]["ci95"]) if wins else "n/a", r["file"]))
    return table("Evaluated checkpoints (95% intervals)", rows, ("checkpoint", "step", "KL to reference (nats)", "reward accuracy",
                                                                 "log-ratio improved", "win rate", "file"))


def _samples(result: dict[str, Any]) -> str:
    samples = result.get("samples") or []
    if not samples:
        return ""
    rows = [tuple(prompt_text(s.get(k)) for k in ("prompt", "policy", "reference")) for s in samples]
    return table("Samples (temperature 1)", rows, ("prompt", "policy", "reference"), pre=True)

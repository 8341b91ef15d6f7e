"""Every report a person opens (a run, a sweep, an iteration, the demo), parsed with a real HTML parser:
a header in sentences, results in ``<table>``s with numbers aligned and intervals as ``87.6% [84, 90]``,
no dict or list literal anywhere, and a sweep frontier that plots a beta-free quantity or the judge's score.
The pages are built from small hand-made run folders (no training), so this file runs in seconds;
the sweep's end-to-end path with a judge is in tests/test_sweep.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from preftune.report.html import table, write_report
from preftune.report.series import write_any, write_iteration_report
from preftune.report.sweep import write_sweep_report
from preftune.report.text import is_numeric, share_interval
from test_report import Page, embedded_pngs, parse

#: what a Python dict or list literal looks like once printed: {"key": ..., ['a', ...], [{...
LITERAL = re.compile(r"\{\s*['\"]|\[\s*\{|\[\s*['\"]|\{\s*\}")
STATUS = {"status": "finished", "precision": {"bf16": False, "setting": "auto", "why": "CPU without bf16 units"},
          "processor": "CPU Test Processor (2 cores)", "step": 6, "seconds": 12.5}


def visible_text(page: Page) -> str:
    return " ".join(page.text)


def tables(source: str) -> list[list[list[tuple[str, str]]]]:
    """Each ``<table>`` of the page as rows of (tag + class, text) cells."""
    from html.parser import HTMLParser

    class Tables(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.found: list[list[list[tuple[str, str]]]] = []
            self.cell: list[str] | None = None

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if tag == "table":
                self.found.append([])
            elif tag == "tr":
                self.found[-1].append([])
            elif tag in ("td", "th"):
                self.cell = [f"{tag}.{dict(attrs).get('class') or ''}", ""]

        def handle_endtag(self, tag: str) -> None:
            if tag in ("td", "th") and self.cell is not None:
                self.found[-1][-1].append((self.cell[0], self.cell[1]))
                self.cell = None

        def handle_data(self, data: str) -> None:
            if self.cell is not None:
                self.cell[1] += data

    parser = Tables()
    parser.feed(source)
    return parser.found


def check_page(path: Path) -> tuple[Page, str]:
    """Parsed and closed in order, no script, no dict literal in what a person reads; the page and its visible text."""
    page = parse(path)
    text = visible_text(page)
    assert "script" not in page.tags
    assert not LITERAL.search(text), LITERAL.search(text)
    embedded_pngs(page)
    return page, text


def _run_folder(folder: Path, beta: float, differences: list[float], kl: float, *, judge: dict | None = None) -> None:
    folder.mkdir(parents=True)
    margins = [beta * d for d in differences]
    result = {"checkpoint": "final", "step": 6, "policy": str(folder / "final"), "reference": "base",
              "preference": {"pairs": len(differences), "beta": beta, "rewards/margins": sum(margins) / len(margins),
                             "rewards/accuracies": sum(d > 0 for d in differences) / len(differences),
                             "alignment/differences": differences, "alignment/mean": sum(differences) / len(differences),
                             "rewards/chosen": 0.1, "rewards/rejected": -0.1, "alignment/improved": 0.75, "alignment/unchanged": 0.0,
                             "alignment/quantiles": {"p5": -1.0, "p50": 1.0, "p95": 2.0}, "logratio/policy_accuracy": 0.75,
                             "logratio/reference_accuracy": 0.5, "perplexity/chosen": 3.0, "reference/perplexity/chosen": 3.5},
              "kl": {"mean": kl, "stderr": 0.1, "n": 16, "prompts": 8, "mean_tokens": 5.0, "finished": 1.0},
              "samples": [{"prompt": [{"role": "user", "content": "hi"}], "policy": "a", "reference": "b"}]}
    if judge:
        result["win_rate"] = [judge]
    (folder / "eval.json").write_text(json.dumps(result), encoding="utf-8")
    (folder / "status.json").write_text(json.dumps(STATUS), encoding="utf-8")
    (folder / "config.yaml").write_text(f"model:\n  path: tiny-model\nloss:\n  name: dpo\n  beta: {beta}\n", encoding="utf-8")
    (folder / "data_report.json").write_text(json.dumps({"train": {"records": 64, "kept": 60}, "eval": {"records": 32, "kept": 32}}))


#: beta 0.3 has the largest implicit reward margin (beta x log-ratio margin) but the smallest log-ratio margin:
#: the "free lunch" the old frontier showed
SWEEP = {0.05: ([2.0, 4.0, 3.0, -1.0], 3.0), 0.1: ([1.5, 2.5, 2.0, -0.5], 2.0), 0.3: ([1.0, 1.5, 1.2, 0.1], 1.0)}


def _sweep_folder(root: Path, *, judged: bool) -> Path:
    runs = []
    for beta, (differences, kl) in SWEEP.items():
        wins = round(8 * (0.5 + kl / 10))
        judge = {"judge": "function judges:better", "win_rate": wins / 16 + 0.5 - 0.25, "ci95": [0.3, 0.8], "interval": "wilson",
                 "wins": wins, "losses": 2, "ties": 0, "n": 16} if judged else None
        _run_folder(root / f"beta-{beta}", beta, differences, kl, judge=judge)
        runs.append({"label": f"beta={beta}", "folder": f"beta-{beta}", "reference": "cache", "reference_warm": beta != 0.05})
    (root / "sweep.json").write_text(json.dumps({"swept": ["loss.beta=0.05,0.1,0.3"], "runs": runs, "reference_passes": 1,
                                                 "judge": "function judges:better" if judged else None}), encoding="utf-8")
    return root


def test_intervals_and_numbers_are_written_for_people() -> None:
    assert share_interval(0.876, [0.84, 0.90]) == "87.6% [84, 90]"
    assert share_interval(0.5, [0.495, 0.505]) == "50.0% [49.5, 50.5]"
    assert all(is_numeric(c) for c in ("87.6% [84, 90]", "0.412 [0.301, 0.523]", "-1.5", "n/a", "1.25 ± 0.5"))
    assert not any(is_numeric(c) for c in ("beta=0.1", "final", "3 / 1 / 0 (4)"))
    html = table("t", [("accuracy", "87.6% [84, 90]")], ("what", "value"))
    assert '<td class="num">87.6% [84, 90]</td>' in html and "<td>accuracy</td>" in html


def test_the_sweep_frontier_without_a_judge_is_beta_free(tmp_path: Path) -> None:
    folder = _sweep_folder(tmp_path / "sweep", judged=False)
    _, text = check_page(write_sweep_report(folder))
    data = json.loads((folder / "plots" / "frontier.json").read_text())
    assert [p["quantity"] for p in data["panels"]] == ["logratio_margin", "accuracy"]
    assert all("not a reward" in p["y_label"] for p in data["panels"])
    margin = {p["label"]: p for p in data["panels"][0]["points"]}
    for beta, (differences, kl) in SWEEP.items():
        point = margin[f"beta={beta}"]
        assert point["y"] == pytest.approx(sum(differences) / len(differences))  # margin / beta, not the reward margin
        assert point["x"] == kl and point["x_ci"][0] < kl < point["x_ci"][1] and point["y_ci"][0] < point["y"] < point["y_ci"][1]
    # the reward margin would put beta 0.3 on top; the beta-free margin puts it at the bottom
    assert margin["beta=0.3"]["y"] < margin["beta=0.05"]["y"]
    assert "reference read from cache" not in text and "No judge was given" in text and "not rewards" in text
    source = (folder / "report.html").read_text()
    runs = next(t for t in tables(source) if t[0][0][1] == "value")
    assert [c[1] for c in runs[0]] == ["value", "KL to reference (nats)", "log-ratio margin (nats)", "held-out accuracy",
                                       "training time (s)", "folder"]
    assert len(runs) == 4 and all(c[0] == "td.num" for row in runs[1:] for c in row[1:5])
    assert runs[3][3][1] == "100.0% [51, 100]"  # 4 of 4 pairs, Wilson
    for needle in ("3 runs of preference tuning (loss dpo) from tiny-model", "beta=0.05 12.5 s", "60 training examples",
                   "Precision: fp32 (CPU without bf16 units)", "Processor: CPU Test Processor (2 cores)"):
        assert needle in text, needle


def test_the_sweep_frontier_with_a_judge_plots_its_win_rate_and_the_table_shows_it(tmp_path: Path) -> None:
    folder = _sweep_folder(tmp_path / "sweep", judged=True)
    _, text = check_page(write_sweep_report(folder))
    data = json.loads((folder / "plots" / "frontier.json").read_text())
    assert [p["quantity"] for p in data["panels"]] == ["win:function judges:better"]
    evals = {f"beta={b}": json.loads((folder / f"beta-{b}" / "eval.json").read_text()) for b in SWEEP}
    for point in data["panels"][0]["points"]:
        assert point["y"] == evals[point["label"]]["win_rate"][0]["win_rate"] and point["y_ci"] == [0.3, 0.8]
    assert "win rate against the reference (judges:better)" in text
    assert "Judged against the reference's samples by function judges:better" in text


def test_a_run_report_reads_as_sentences_and_tables(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _run_folder(run, 0.1, [1.0, -0.5, 2.0], 0.8, judge={"judge": "reward model rm", "win_rate": 0.625, "ci95": [0.4, 0.8],
                                                          "interval": "wilson", "wins": 5, "losses": 3, "ties": 0, "n": 8,
                                                          "mean_len_policy": 3.0, "mean_len_reference": 4.0, "longer_wins": None,
                                                          "reward_policy": 1.5, "reward_reference": 1.0, "reward_policy_ci95": [1.2, 1.8]})
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)), encoding="utf-8")
    _, text = check_page(write_report(run))
    for needle in ("Preference tuning (loss dpo, beta 0.1) of tiny-model: 3 optimizer steps, which took 12.5 s.",
                   "Data: 60 training examples (of 64 records), 32 held-out examples (of 32 records).",
                   "Precision: fp32 (CPU without bf16 units). Processor: CPU Test Processor (2 cores).",
                   "62.5% [40, 80]", "1.5 [1.2, 1.8] / 1", "user: hi"):
        assert needle in text, needle
    source = (run / "report.html").read_text()
    assert '<td class="num">62.5% [40, 80]</td>' in source


def _iteration_folder(root: Path) -> Path:
    root.mkdir()
    rounds = []
    for n, (score, kl) in enumerate(((0.6, 0.5), (0.7, 1.1)), start=1):
        (root / f"round-{n}").mkdir()
        (root / f"round-{n}" / "status.json").write_text(json.dumps({**STATUS, "seconds": 10.0 * n}), encoding="utf-8")
        rounds.append({"round": n, "policy": f"round-{n}/final", "steps": 4, "pairing": {"pairs": 30, "ties": 2,
                                                                                        "sample_score": {"mean": 0.5, "stderr": 0.05}},
                       "judge_score": {"mean": score, "stderr": 0.05, "n": 64},
                       "win_rate_vs_initial": {"win_rate": 0.55 + n / 10, "ci95": [0.5, 0.8]},
                       "kl_to_initial": {"mean": kl, "stderr": 0.1}})
    summary = {"rounds_planned": 2, "judge": "function judges:score", "initial": {"judge_score": {"mean": 0.5, "stderr": 0.05, "n": 64},
                                                                                  "path": "tiny-model"},
               "rounds": rounds, "samples": [{"prompt": "p", "policy": "a", "initial": "b"}]}
    (root / "iterate.json").write_text(json.dumps(summary), encoding="utf-8")
    return root


def test_the_iteration_report_shows_rounds_side_by_side(tmp_path: Path) -> None:
    folder = _iteration_folder(tmp_path / "iterate")
    page, text = check_page(write_iteration_report(folder))
    assert len(embedded_pngs(page)) == 2
    rounds = next(t for t in tables((folder / "report.html").read_text()) if t[0][0][1] == "round")
    assert [row[0][1] for row in rounds[1:]] == ["0 (initial)", "1", "2"]
    assert rounds[3][2][1] == "75.0% [50, 80]" and rounds[3][2][0] == "td.num"
    for needle in ("2 of 2 rounds of iterative DPO done from tiny-model", "round 1 10 s, round 2 20 s", "Processor: CPU Test Processor"):
        assert needle in text, needle
    assert write_any(folder) == folder / "report.html"


def test_the_demo_report_has_a_header_table_and_a_results_table(tmp_path: Path) -> None:
    from preftune.demo.evaluation import write_demo_report

    policy = {"beta": 0.2, "ground_truth_reward": 1.2, "positive_share": 0.9, "well_formed_share": 0.95, "mean_words": 9.5,
              "win_rate_ground_truth": {"win_rate": 0.876, "ci95": [0.84, 0.90]}, "win_rate_reward_model": {"win_rate": 0.7, "ci95": [0.65, 0.75]},
              "kl_to_reference": {"mean": 2.5, "stderr": 0.2}, "preference_accuracy_heldout": 0.8, "perplexity_heldout": 3.2,
              "samples": [{"prompt": "the plot", "policy": " was great .", "reference": " was dull ."}]}
    summary = {"wall_time_s": 40.0, "stage_seconds": {"base model": 1.7, "sft": 4.9}, "settings": {"hidden_size": 64, "num_layers": 2,
                                                                                                   "num_heads": 4, "vocab_size": 400},
               "pairs": {"train": 2048, "train_ties_left_out": 3, "eval": 200, "eval_ties_left_out": 1},
               "reference": {"ground_truth_reward": 0.1, "positive_share": 0.5, "well_formed_share": 0.9, "mean_words": 9.0,
                             "perplexity_heldout": 3.0},
               "policies": [policy], "reward_model_heldout_accuracy": 0.85, "precision": "fp32", "processor": "CPU Test (2 cores)"}
    out = tmp_path / "demo"
    out.mkdir()
    _, text = check_page(write_demo_report(out, summary))
    assert "87.6% [84, 90]" in text and "base model" in text and "2048 training pairs" in text and "CPU Test (2 cores)" in text
    found = tables((out / "report.html").read_text())
    results = next(t for t in found if t[0][0][1] == "metric")
    assert [c[1] for c in results[0]] == ["metric", "reference (SFT)", "DPO beta=0.2"]
    assert ("td.num", "87.6% [84, 90]") in [c for row in results for c in row]
    stages = next(t for t in found if t[0][0][1] == "stage")
    assert [row[0][1] for row in stages[1:]] == ["base model", "sft", "whole demo"]

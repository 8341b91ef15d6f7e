"""The run report: valid self-contained HTML, every image a real embedded PNG, missing parts tolerated."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import REPO
from preftune.errors import PreftuneError
from preftune.report.html import format_table, reward_axis, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VOID = {"meta", "img", "br", "hr", "link", "input"}


class Page(HTMLParser):
    """Collects images, tags and text, and checks that every element is closed in order."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.images: list[dict[str, str]] = []
        self.tags: set[str] = set()
        self.text: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        if tag == "img":
            self.images.append({k: v or "" for k, v in attrs})
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(path: Path) -> Page:
    page = Page()
    source = path.read_text(encoding="utf-8")
    assert source.startswith("<!DOCTYPE html>")
    page.feed(source)
    page.close()
    assert not page.errors and not page.stack, (page.errors, page.stack)
    return page


def embedded_pngs(page: Page) -> list[bytes]:
    out = []
    for image in page.images:
        prefix = "data:image/png;base64,"
        assert image["src"].startswith(prefix), image["src"][:40]
        data = base64.b64decode(image["src"][len(prefix):], validate=True)
        assert data.startswith(PNG_SIGNATURE)
        out.append(data)
    return out


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def short_run(model_dir: Path, train: Path, held: Path | None, out: Path, *overrides: str) -> Path:
    from preftune.config.schema import DPOConfig, load_config
    from preftune.stages.dpo import run as run_dpo

    cfg = load_config(DPOConfig, REPO / "configs" / "dpo-tiny.yaml", [
        f"--model.path={model_dir}", f"--data.train={train}", f"--data.eval={held}" if held else "--data.eval=[]",
        f"--train.output_dir={out}", "--train.progress=false", "--train.max_steps=6", "--train.log_every=1", *overrides])
    return run_dpo(cfg)


def test_report_of_an_evaluated_run_embeds_every_plot(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    from preftune.eval.run import EvalSettings, run_eval

    train, held = preference_files
    run = short_run(tiny_model_dir, train, held, tmp_path / "run", "--train.eval_every=3", "--train.save_every=3")
    judge = tmp_path / "judge.py"
    judge.write_text("def longer(prompt, a, b):\n    return 0.5 if len(a) == len(b) else len(a) > len(b)\n", encoding="utf-8")
    common = {"judge": f"{judge}:longer", "max_prompts": 4, "max_new_tokens": 6}
    run_eval(EvalSettings(policy=str(run / "checkpoints" / "step-3"), **common))
    final = run_eval(EvalSettings(policy=str(run), **common))

    path = write_report(run)
    assert path == run / "report.html"
    page = parse(path)
    pngs = embedded_pngs(page)
    expected = {"loss", "rewards", "margins", "accuracies", "logps", "alignment", "win_rate", "reward_kl"}
    assert {p.stem for p in (run / "plots").glob("*.png")} == expected
    # each embedded image is one of the PNG files, byte for byte
    assert sorted(pngs) == sorted(p.read_bytes() for p in (run / "plots").glob("*.png"))
    assert "script" not in page.tags and "link" not in page.tags  # nothing to fetch, nothing to run
    text = " ".join(page.text)
    for needle in ("Evaluated checkpoints", "step-3", "reward accuracy", "KL per completion", "Win rate, judged by",
                   "Data (data_report.json)", "Last logged training step", "loss.name", "Precision: fp32", "Processor: CPU",
                   "optimizer steps, which took"):
        assert needle in text, needle
    assert f"{100 * final['preference']['rewards/accuracies']:.1f}%" in text
    assert "Samples (temperature 1)" in text

    # Evaluations removed: the report goes back to curves only, and stale plots go away.
    for name in ("eval.json", "eval-step-3.json"):
        (run / name).unlink()
    page = parse(write_report(run))
    assert len(embedded_pngs(page)) == 5
    assert {p.stem for p in (run / "plots").glob("*.png")} == {"loss", "rewards", "margins", "accuracies", "logps"}
    assert "Not evaluated yet" in " ".join(page.text)


def test_report_of_a_run_without_eval_points_and_of_an_empty_folder(tiny_model_dir: Path, preference_files: tuple[Path, Path],
                                                                  tmp_path: Path) -> None:
    train, _ = preference_files
    run = short_run(tiny_model_dir, train, None, tmp_path / "run", "--train.save_every=null")
    page = parse(write_report(run))
    assert len(embedded_pngs(page)) == 5
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PreftuneError, match=r"not a run folder \(it holds no config.yaml, metrics.jsonl or eval"):
        write_report(empty)  # a report is never written into a folder that holds no run
    assert list(empty.iterdir()) == []
    with pytest.raises(PreftuneError, match="not a run folder"):
        write_report(tmp_path / "missing")
    (empty / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n{broken\n', encoding="utf-8")
    with pytest.raises(PreftuneError, match="metrics.jsonl, line 2"):
        write_report(empty)


def test_text_from_the_results_is_escaped(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)), encoding="utf-8")
    hostile = "<script>alert(1)</script>"
    result = {"checkpoint": "final", "step": 3, "policy": hostile, "reference": "r",
              "samples": [{"prompt": [{"role": "user", "content": hostile}], "policy": hostile, "reference": None}]}
    (run / "eval.json").write_text(json.dumps(result), encoding="utf-8")
    page = parse(write_report(run))
    assert "script" not in page.tags
    assert hostile in " ".join(page.text)  # shown as text
    assert len(embedded_pngs(page)) == 1  # the loss curve; SFT-like metrics have nothing else


def test_reward_axis_takes_the_first_measure_every_checkpoint_has() -> None:
    rm = {"win_rate": [{"win_rate": 0.6, "reward_policy": 1.5}], "preference": {"rewards/margins": 0.2}}
    function = {"win_rate": [{"win_rate": 0.7}], "preference": {"rewards/margins": 0.3}}
    margin_only = {"preference": {"rewards/margins": 0.4}}
    assert reward_axis([rm, rm]) == ("reward of policy samples (reward model)", [1.5, 1.5])
    assert reward_axis([rm, function]) == ("win rate against the reference", [0.6, 0.7])
    assert reward_axis([rm, function, margin_only]) == ("implicit reward margin on held-out pairs", [0.2, 0.3, 0.4])
    assert reward_axis([rm, {}]) is None


def test_format_table_shows_each_section() -> None:
    results = {
        "checkpoint": "final", "step": 30, "policy": "p", "reference": "r",
        "kl": {"mean": 1.25, "stderr": 0.5, "n": 8, "prompts": 4, "mean_tokens": 10.0, "finished": 0.5},
        "win_rate": [{"judge": "function m:f", "win_rate": 0.75, "ci95": [0.4, 0.9], "interval": "wilson", "wins": 3,
                      "losses": 1, "ties": 0, "n": 4, "mean_len_policy": 10.0, "mean_len_reference": 8.0, "longer_wins": None}],
    }
    table = format_table(results)
    assert "policy p (final, step 30) vs reference r" in table
    assert "1.25 [0.27, 2.23]" in table  # KL with its 95% interval (1.96 standard errors)
    assert "75.0% [40, 90]" in table and "Wilson interval" in table and "3 / 1 / 0 (4)" in table and "n/a" in table
    assert "Preference" not in table
    assert "nothing evaluated" in format_table({"policy": "p"})

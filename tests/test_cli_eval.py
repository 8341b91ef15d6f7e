"""`preftune generate`, `preftune eval` and `preftune report` from the command line, after a short DPO run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, run_cli, write_jsonl


@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from preftune.config.schema import DPOConfig, load_config
    from preftune.stages.dpo import run as run_dpo

    train, held = preference_files
    out = tmp_path_factory.mktemp("eval-cli") / "run"
    cfg = load_config(DPOConfig, REPO / "configs" / "dpo-tiny.yaml",
                      [f"--model.path={tiny_model_dir}", f"--data.train={train}", f"--data.eval={held}",
                       f"--train.output_dir={out}", "--train.progress=false", "--train.max_steps=6", "--train.eval_every=null"])
    return run_dpo(cfg)


@pytest.mark.full
def test_generate_eval_report_from_the_cli(dpo_run: Path, tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "the food was"}, {"prompt": "service"}])
    out = tmp_path / "gen.jsonl"
    result = run_cli("generate", str(dpo_run), str(prompts), "--out", str(out), "--num-samples", "2", "--max-new-tokens", "8",
                     "--temperature", "0.7", "--seed", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 4 and all("completion" in r for r in rows)

    judge = tmp_path / "judge.py"
    judge.write_text("def always_policy(prompt, policy, reference):\n    return 1.0\n")
    result = run_cli("eval", str(dpo_run), "--judge", f"{judge}:always_policy", "--max-prompts", "6", "--num-samples", "1",
                     "--max-new-tokens", "8", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (dpo_run / "eval.json").is_file()
    text = json.dumps(summary)
    assert "win_rate" in text and "rewards/accuracies" in text
    saved = json.loads((dpo_run / "eval.json").read_text())
    assert [w["win_rate"] for w in saved["win_rate"]] == [1.0]  # one judge, always for the policy
    assert saved["kl"]["n"] == 6
    assert (dpo_run / "report.html").is_file()

    result = run_cli("report", str(dpo_run))
    assert result.returncode == 0, result.stderr[-2000:]
    html = (dpo_run / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3

    bad = run_cli("eval", str(dpo_run), "--judge", "no_such_module_xyz:f")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "no_such_module_xyz" in bad.stderr

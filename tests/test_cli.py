"""cli/: the parser built from the VERBS table, dotted overrides, --print-config, and short clean errors.

What the verbs do is tested with the modules they call (test_dpo.py runs `preftune dpo`,
test_cli_eval.py `generate`, `eval` and `report`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import DPO_TINY, REPO, run_cli
from preftune.cli.main import build_parser, main
from preftune.cli.verbs import VERBS
from preftune.config.schema import DPOConfig, load_config
from preftune.errors import ConfigError


def listed(help_text: str) -> list[str]:
    """The sub-commands an argparse help lists, in order (continuation lines are indented deeper)."""
    return re.findall(r"^ {4}(\S+)", help_text, flags=re.MULTILINE)


def test_help_lists_every_verb_in_table_order(capsys: pytest.CaptureFixture[str]) -> None:
    top = [verb.group or verb.name for verb in VERBS]
    assert listed(build_parser().format_help()) == list(dict.fromkeys(top))
    for group in {verb.group for verb in VERBS if verb.group}:
        with pytest.raises(SystemExit) as exit_info:
            main([group, "--help"])
        assert exit_info.value.code == 0
        assert listed(capsys.readouterr().out) == [verb.name for verb in VERBS if verb.group == group]
    assert {"inspect", "dpo", "sft", "rm", "score", "generate", "eval", "report", "demo"} <= {verb.name for verb in VERBS}


@pytest.mark.full
def test_help_from_the_module_entry_point() -> None:
    result = run_cli("--help", timeout=300)
    assert result.returncode == 0, result.stderr
    assert listed(result.stdout) == list(dict.fromkeys(verb.group or verb.name for verb in VERBS))


def test_a_verb_without_overrides_refuses_dotted_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path), "--train.lr=1"]) == 2
    err = capsys.readouterr().err
    assert "unrecognised arguments: --train.lr=1" in err and "Traceback" not in err
    assert not (tmp_path / "report.html").exists()  # the verb did not run


def test_print_config_prints_yaml_with_the_overrides_applied(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overrides = ["--train.lr=0.005", "--loss.beta=0.25", "--data.max_length=96", f"--train.output_dir={tmp_path / 'never'}"]
    assert main(["dpo", str(DPO_TINY), "--print-config", *overrides]) == 0
    printed = capsys.readouterr().out
    data = yaml.safe_load(printed)
    assert data["train"]["lr"] == 0.005 and data["loss"]["beta"] == 0.25 and data["data"]["max_length"] == 96
    assert data["train"]["max_steps"] == 30  # from the YAML file
    assert not (tmp_path / "never").exists()  # nothing trained
    # the printed YAML is a complete config: read back, it is the same config
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed, encoding="utf-8")
    assert load_config(DPOConfig, saved) == load_config(DPOConfig, DPO_TINY, overrides)


@pytest.mark.parametrize("override,hint", [
    ("--train.lrr=1", "Did you mean '--train.lr'?"),
    ("--loss.betta=0.2", "Did you mean '--loss.beta'?"),
    ("--data.max_lenght=64", "Did you mean '--data.max_length'?"),
])
def test_an_unknown_override_names_the_nearest_key(override: str, hint: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dpo", str(DPO_TINY), override]) == 2
    err = capsys.readouterr().err
    assert hint in err and "Traceback" not in err


def test_a_loss_setting_the_loss_does_not_use_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dpo", str(DPO_TINY), "--loss.gamma=0.7"]) == 2
    err = capsys.readouterr().err
    assert "gamma is not used by loss 'dpo'" in err
    assert "(it takes: beta, f_alpha_divergence_coef, f_divergence_type, label_smoothing, ld_alpha, nll_alpha, use_weighting)" in err
    # the same setting is fine for the loss that takes it
    assert main(["dpo", str(DPO_TINY), "--loss.name=simpo", "--reference.strategy=none", "--loss.gamma=0.7", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["loss"]["gamma"] == 0.7


def test_debug_shows_the_error_itself() -> None:
    with pytest.raises(ConfigError, match="gamma"):
        main(["--debug", "dpo", str(DPO_TINY), "--loss.gamma=0.7"])


@pytest.mark.full
def test_cli_errors_are_short_and_clean(tmp_path: Path, tiny_model_dir: Path, preference_files: tuple[Path, Path]) -> None:
    train, _ = preference_files
    cases = [
        ([str(DPO_TINY), "--train.lr=fast"], "'train.lr': expected a number"),
        ([str(DPO_TINY), "--trian.lr=1"], "Did you mean '--train.lr'"),
        ([str(DPO_TINY), f"--model.path={tmp_path / 'missing'}", f"--data.train={train}"], f"no folder '{tmp_path / 'missing'}'; nor can it"),
    ]
    for args, message in cases:
        result = run_cli("dpo", *args, timeout=300)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        assert "Traceback" not in result.stderr


def test_silent_acceptance_is_gone(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from preftune.cli.main import main

    # eval settings out of range
    assert main(["eval", str(tiny_model_dir), "--beta", "0", "--out", str(tmp_path / "e")]) == 2
    assert "beta must be positive" in capsys.readouterr().err
    assert main(["eval", str(tiny_model_dir), "--max-pairs", "-1", "--out", str(tmp_path / "e")]) == 2
    assert "max_pairs must be at least 1" in capsys.readouterr().err
    # generate into a folder
    assert main(["generate", str(tiny_model_dir), str(preference_files[1]), "--out", str(tmp_path)]) == 2
    assert "is a folder; give a file to write" in capsys.readouterr().err
    # a column mapped to a field the file does not have is not replaced by the file's own field
    assert main(["data", "inspect", str(preference_files[1]), "--columns", "prompt=question", "--on-error", "error"]) == 2
    assert "has no field 'question' (columns maps 'prompt' to it)" in capsys.readouterr().err
    assert main(["data", "inspect", str(preference_files[1]), "--columns", "prompt=question", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["dropped"] == {"missing_field": 32}
    # records dropped because they cannot fit are said on the console, not only in the report
    records = [json.loads(line) for line in preference_files[0].read_text().splitlines()]
    records.append({"prompt": "word " * 300, "chosen": " yes", "rejected": " no"})  # longer than max_length on its own
    data = tmp_path / "one-too-long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["dpo", str(REPO / "configs" / "dpo-tiny.yaml"), f"--model.path={tiny_model_dir}", f"--data.train={data}",
                 f"--train.output_dir={tmp_path / 'cut'}", "--data.max_prompt_length=null", "--train.max_steps=1",
                 "--train.progress=false", "--train.report=false", "--data.eval=[]"]) == 0
    err = capsys.readouterr().err
    assert f"; train data: kept 64 of {len(records)} pairs, dropped 1 too_long (see data_report.json); reference copy;" in err

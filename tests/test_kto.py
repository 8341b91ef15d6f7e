"""stages/kto.py: KTO end to end on unpaired records (the loss itself is checked against TRL in
test_losses_trl_parity.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import preftune
from conftest import REPO, read_metrics, write_jsonl
from preftune.errors import PreftuneError

CONFIG = REPO / "configs" / "kto-tiny.yaml"


def unpaired(n: int, seed: int) -> list[dict]:
    from preftune.models.tiny import synthetic_preferences

    rows = []
    for pair in synthetic_preferences(n, seed=seed):
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return rows


def log_ratio_margin(policy_dir: Path, reference_dir: Path, records: list[dict]) -> float:
    """Mean log pi/ref of the desirable completions minus that of the undesirable ones (nats)."""
    from preftune.config.schema import ModelConfig
    from preftune.data.collate import collate_unpaired
    from preftune.data.records import UnpairedExample
    from preftune.data.tokenize import tokenize_unpaired
    from preftune.models.load import load_causal_lm
    from preftune.models.scorers import SequenceLogps
    from preftune.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(reference_dir))
    items = tokenize_unpaired([UnpairedExample(r["prompt"], r["completion"], r["label"]) for r in records], tokenizer, max_length=128)
    batch = collate_unpaired(items, tokenizer.pad_token_id)
    with torch.no_grad():
        scores = [SequenceLogps(load_causal_lm(ModelConfig(path=str(folder))).eval())(batch["input_ids"], batch["attention_mask"],
                                                                                     batch["labels"])[0] for folder in (policy_dir, reference_dir)]
    ratio, desirable = scores[0] - scores[1], batch["desirable"]
    return float(ratio[desirable].mean() - ratio[~desirable].mean())


def test_kto_raises_desirable_completions_over_undesirable_ones_on_held_out_records(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", unpaired(64, seed=1))
    result = preftune.kto(str(tiny_model_dir), train_data=str(data), config=preftune.load_config(preftune.KTOConfig, CONFIG),
                          output_dir=str(tmp_path / "run"), max_steps=30, progress=False, report=False)
    held_out = unpaired(24, seed=7)
    margin = log_ratio_margin(result.run_dir / "final", tiny_model_dir, held_out)
    assert margin > 0.5, margin  # the initial policy is the reference: 0 there
    lines = [m for m in read_metrics(result.run_dir) if "loss" in m]
    assert {"rewards/chosen", "rewards/rejected", "kl", "logps/chosen", "logps/rejected"} <= set(lines[-1])
    assert lines[-1]["loss"] < lines[0]["loss"]
    report = json.loads((result.run_dir / "data_report.json").read_text())
    assert report["train"]["kept"] == 128 and report["train"]["format"] == "unpaired"


def test_the_reference_cache_works_for_kto(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", unpaired(16, seed=1))
    base = [f"--model.path={tiny_model_dir}", f"--data.train={data}", "--train.max_steps=3", "--train.log_every=1",
            "--train.progress=false", "--train.report=false"]
    from preftune.cli import main

    cache = ["--reference.strategy=cache", f"--reference.cache_dir={tmp_path / 'cache'}"]
    for name, extra in (("copy", ["--reference.strategy=copy"]), ("cold", cache), ("warm", cache)):
        assert main(["kto", str(CONFIG), *base, f"--train.output_dir={tmp_path / name}", *extra]) == 0
    warm = [json.loads((tmp_path / n / "reference.json").read_text())["train_cache"]["warm"] for n in ("cold", "warm")]
    assert warm == [False, True]
    losses = {n: [m["loss"] for m in read_metrics(tmp_path / n)] for n in ("copy", "cold", "warm")}
    assert losses["cold"] == pytest.approx(losses["copy"], abs=1e-6) and losses["warm"] == pytest.approx(losses["copy"], abs=1e-6)


def test_pairs_are_split_on_request_and_refused_otherwise(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    from preftune.cli import main

    base = ["kto", str(CONFIG), f"--model.path={tiny_model_dir}", f"--data.train={preference_files[0]}", "--train.max_steps=1",
            "--train.progress=false", "--train.report=false"]
    with pytest.raises(PreftuneError, match="kto.split_pairs=true"):
        main(["--debug", *base, f"--train.output_dir={tmp_path / 'refused'}"])
    assert main([*base, f"--train.output_dir={tmp_path / 'split'}", "--kto.split_pairs=true"]) == 0
    report = json.loads((tmp_path / "split" / "data_report.json").read_text())["train"]
    assert report["findings"]["split_pairs"] == 64
    assert main(["dpo", str(REPO / "configs" / "dpo-tiny.yaml"), "--loss.name=kto"]) == 2  # says: use preftune kto


def test_each_record_gets_another_records_completion_for_its_kl_row() -> None:
    from preftune.data.prepare import mismatched_pairs
    from preftune.data.records import TokenizedUnpaired

    items = [TokenizedUnpaired([1, 2], [10 + i] * (i + 1), desirable=i % 2 == 0, index=i) for i in range(5)]
    rows = mismatched_pairs(items, max_length=4, seed=3)
    assert [r.chosen_ids for r in rows] == [x.completion_ids for x in items]
    partners = [next(j for j, x in enumerate(items) if x.completion_ids[: len(r.rejected_ids)] == r.rejected_ids) for r in rows]
    assert sorted(partners) == list(range(5)) and all(p != i for i, p in enumerate(partners))  # a derangement
    assert all(len(r.prompt_ids) + len(r.rejected_ids) <= 4 for r in rows)  # cut to fit
    assert [r.preference for r in rows] == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert mismatched_pairs(items, max_length=4, seed=3) == rows  # fixed per record: cacheable
    with pytest.raises(PreftuneError, match="at least 2 records"):
        mismatched_pairs(items[:1], max_length=4, seed=0)


@pytest.mark.slow
def test_label_balance_is_reported_warned_and_margins_logged(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from preftune.cli import main

    rows = unpaired(48, seed=3)
    unbalanced = [r for r in rows if r["label"]] + [r for r in rows if not r["label"]][:12]  # 48 desirable, 12 undesirable
    data = write_jsonl(tmp_path / "unbalanced.jsonl", unbalanced)
    assert main(["data", "inspect", str(data)]) == 0
    shown = capsys.readouterr().out
    assert "labels (unpaired records kept)" in shown and re.search(r"\n  desirable +48\n  undesirable +12\n", shown)
    assert "between 3 and 4" in shown
    settings = dict(config=preftune.load_config(preftune.KTOConfig, CONFIG), max_steps=2, log_every=1, progress=False, report=False)
    with pytest.warns(UserWarning, match=r"= 4.00, outside the \[1, 4/3\].*undesirable_weight between 3 and 4"):
        result = preftune.kto(str(tiny_model_dir), train_data=str(data), output_dir=str(tmp_path / "unbalanced"), **settings)
    line = read_metrics(result.run_dir)[0]
    assert line["rewards/margins"] == pytest.approx(line["rewards/chosen"] - line["rewards/rejected"])  # as TRL's KTO logs it
    assert json.loads((result.run_dir / "data_report.json").read_text())["train"]["labels"] == {"desirable": 48, "undesirable": 12}
    import warnings

    with warnings.catch_warnings():  # weights in the recommended range: nothing to say
        warnings.simplefilter("error", UserWarning)
        preftune.kto(str(tiny_model_dir), train_data=str(data), output_dir=str(tmp_path / "weighted"), loss={"undesirable_weight": 3.5},
                     **{k: v for k, v in settings.items() if k != "config"}, kto={})
    everything_good = write_jsonl(tmp_path / "desirable.jsonl", [r for r in rows if r["label"]])
    with pytest.warns(UserWarning, match="every record is desirable"):
        preftune.kto(str(tiny_model_dir), train_data=str(everything_good), output_dir=str(tmp_path / "all"), **settings)

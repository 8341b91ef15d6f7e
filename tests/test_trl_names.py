"""trl_names.py: the TRL -> preftune table, checked against the installed TRL."""

from __future__ import annotations

import dataclasses
import re

import pytest

from conftest import REPO
from preftune.config.schema import DPOConfig, load_config
from preftune.config.trl_names import TRL_LOSS_TYPES, TRL_NAMES, trl_hint
from preftune.config.typed import _all_keys
from preftune.errors import ConfigError
from preftune.losses import LOSSES

trl = pytest.importorskip("trl", reason="TRL is a dev dependency (make test installs it)")


def trl_fields() -> tuple[set[str], set[str]]:
    from transformers import TrainingArguments

    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    every = {f.name for f in dataclasses.fields(trl.DPOConfig)}
    return every, every - inherited


def test_every_trl_dpo_setting_is_in_the_table() -> None:
    every, own = trl_fields()
    assert own - set(TRL_NAMES) == set(), "TRL DPOConfig fields missing from preftune.config.trl_names.TRL_NAMES"
    assert set(TRL_NAMES) - every == set(), "names in the table that TRL's DPOConfig does not have"


def test_every_target_is_a_preftune_key() -> None:
    keys = set(_all_keys(DPOConfig))
    for name, target in TRL_NAMES.items():
        if isinstance(target, tuple):
            assert target[0] is None and target[1], name
            continue
        for key in re.findall(r"\b(?:model|data|loss|train|reference)\.[a-z_0-9]+", target):
            assert key in keys, f"{name} -> {target}: '{key}' is not a preftune key"
    assert set(TRL_LOSS_TYPES.values()) <= set(LOSSES)


def test_a_trl_name_is_answered_with_preftunes() -> None:
    with pytest.raises(ConfigError, match=r"'per_device_train_batch_size' is TRL's name; preftune's is 'train.batch_size'"):
        load_config(DPOConfig, None, ["--train.per_device_train_batch_size=4"])
    with pytest.raises(ConfigError, match="'learning_rate' is TRL's name; preftune's is 'train.lr'"):
        load_config(DPOConfig, None, ["--learning_rate=1e-6"])
    assert "no equivalent" in trl_hint("activation_offloading")
    assert "preftune's is 'reference.sync_ref_model" in trl_hint("sync_ref_model")
    assert trl_hint("not_a_trl_name") is None


def test_the_docs_list_the_whole_table() -> None:
    page = (REPO / "docs" / "coming-from-trl.md").read_text(encoding="utf-8")
    for name in TRL_NAMES:
        assert f"| `{name}` |" in page, name


def test_every_trl_loss_type_is_a_preftune_loss_name() -> None:
    """TRL's own list of loss types (its error message names them all) is what the table and LOSSES accept."""
    import inspect

    from trl.trainer.dpo_trainer import DPOTrainer

    source = inspect.getsource(DPOTrainer._compute_loss)
    listed = re.search(r"Should be one of \[(.*?)\]", source.replace('"\n', "").replace("\n", " "), re.S)
    assert listed, "TRL's message listing its loss types was not found"
    trl_types = set(re.findall(r"'([a-z_]+)'", listed.group(1)))
    assert len(trl_types) == 15 and trl_types == set(TRL_LOSS_TYPES)
    assert trl_types <= set(LOSSES) and all(LOSSES[t] is LOSSES[TRL_LOSS_TYPES[t]] for t in trl_types)
    for t in trl_types:
        load_config(DPOConfig, None, [f"--loss.name={t}"] + (["--loss.label_smoothing=0.001"] if t == "exo_pair" else []))


def test_no_loss_setting_of_trl_is_left_without_an_equivalent() -> None:
    loss_fields = ["beta", "label_smoothing", "loss_type", "loss_weights", "ld_alpha", "f_divergence_type", "f_alpha_divergence_coef",
                   "use_weighting", "discopop_tau", "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps"]
    assert [name for name in loss_fields if isinstance(TRL_NAMES[name], tuple)] == []
    page = (REPO / "docs" / "coming-from-trl.md").read_text(encoding="utf-8")
    assert "not implemented" not in "".join(line for line in page.splitlines() if any(f"| `{n}` |" in line for n in loss_fields))

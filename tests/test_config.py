"""Config: YAML in, dotted overrides, typed checks, unknown keys named, resolved YAML out."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from preftune.config.schema import (
    DPOConfig,
    from_dict,
    load_config,
    parse_overrides,
    to_dict,
    to_yaml,
)
from preftune.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = DPOConfig()
    dumped = to_yaml(cfg)
    again = load_config(DPOConfig, write(tmp_path, dumped))
    assert again == cfg
    # every default is written out
    data = yaml.safe_load(dumped)
    assert data["train"]["lr"] == 1e-6 and data["loss"]["beta"] == 0.1
    assert data["model"]["lora"]["enabled"] is False


def test_file_values_and_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "data:\n  train: a.jsonl\n  max_length: 256\ntrain:\n  lr: 1e-5\n")
    cfg = load_config(DPOConfig, path, ["--data.max_length=512", "--loss.beta", "0.25", "--model.lora.enabled=true"])
    assert cfg.data.train == ["a.jsonl"]  # a single path becomes a list
    assert cfg.data.max_length == 512  # the override wins
    assert cfg.train.lr == pytest.approx(1e-5)  # YAML reads `1e-5` as a string; accepted as a float
    assert cfg.loss.beta == 0.25
    assert cfg.model.lora.enabled is True
    # the resolved config, reloaded, is the same config
    assert load_config(DPOConfig, write(tmp_path, to_yaml(cfg))) == cfg


def test_unknown_key_names_the_closest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'train.learning_rat'.*"):
        load_config(DPOConfig, write(tmp_path, "train:\n  learning_rat: 1\n"))
    with pytest.raises(ConfigError, match=r"'data.max_lenght'.*Did you mean 'max_length'"):
        load_config(DPOConfig, write(tmp_path, "data:\n  max_lenght: 12\n"))
    with pytest.raises(ConfigError, match=r"Did you mean '--train.batch_size'"):
        load_config(DPOConfig, None, ["--train.batchsize=4"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*Did you mean 'train'"):
        load_config(DPOConfig, write(tmp_path, "trian:\n  lr: 1\n"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  batch_size: eight\n", "'train.batch_size': expected an integer"),
        ("train:\n  batch_size: 2.5\n", "'train.batch_size': expected an integer"),
        ("model:\n  lora:\n    enabled: 1\n", "'model.lora.enabled': expected true or false"),
        ("data:\n  on_error: ignore\n", "'data.on_error': expected one of 'error', 'skip'"),
        ("train:\n  lr: fast\n", "'train.lr': expected a number"),
        ("train: 3\n", "'train': expected a mapping"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("train:\n  lr: -1\n", "train.lr must be positive"),
        ("data:\n  max_prompt_length: 0\n", "max_prompt_length must be at least 1"),
        ("train: [1\n", "not valid YAML"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(DPOConfig, path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_missing_file_and_bad_override_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(DPOConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--train.lr"], DPOConfig)
    with pytest.raises(ConfigError, match="overrides look like"):
        parse_overrides(["train.lr=1"], DPOConfig)


def test_nullable_fields_accept_null() -> None:
    cfg = load_config(DPOConfig, None, ["--train.max_grad_norm=null", "--data.max_prompt_length=null"])
    assert cfg.train.max_grad_norm is None and cfg.data.max_prompt_length is None
    assert from_dict(DPOConfig, to_dict(cfg)) == cfg


def test_shipped_configs_load() -> None:
    files = sorted(CONFIGS.glob("*.yaml"))
    assert files, "configs/ should ship at least one config"
    from preftune.config.schema import STAGES

    for path in files:
        stage = path.name.split("-")[0]  # dpo-tiny.yaml -> the dpo stage
        if stage == "iterate":  # its config lives beside its stage (stages/iterate_config.py)
            from preftune.stages.iterate_config import load_iterate_config

            load_iterate_config(path)
            continue
        assert stage in STAGES, f"{path.name} should start with a stage name ({', '.join(STAGES)})"
        load_config(STAGES[stage], path)


def test_the_shipped_accelerate_config_loads() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / "accelerate" / "ddp.yaml"))
    assert config.distributed_type == "MULTI_GPU" and config.num_processes == 2


def test_a_yaml_merge_key_is_accepted_and_a_repeated_key_still_refused(tmp_path: Path) -> None:
    from preftune.config.yamlfile import read_yaml

    text = "train: &shared\n  lr: 3.0e-5\n  batch_size: 4\nreference:\n  cache_dir: c\n"
    base = read_yaml(write(tmp_path, "defaults: &d\n  lr: 3.0e-5\n  batch_size: 4\ntrain:\n  <<: *d\n  batch_size: 2\n"))
    assert base["train"] == {"lr": 3.0e-5, "batch_size": 2}  # merged, then overridden once, as yaml.safe_load does
    cfg = load_config(DPOConfig, write(tmp_path, "train:\n  batch_size: 3\n  <<: {lr: 3.0e-5, epochs: 2}\n"))
    assert cfg.train.lr == pytest.approx(3e-5) and cfg.train.batch_size == 3 and cfg.train.epochs == 2
    assert load_config(DPOConfig, write(tmp_path, text)).train.lr == pytest.approx(3e-5)
    with pytest.raises(ConfigError, match="given twice"):
        load_config(DPOConfig, write(tmp_path, "train:\n  lr: 1.0e-5\n  lr: 2.0e-5\n"))


def test_caches_default_to_the_users_cache_not_the_current_folder() -> None:
    cfg = DPOConfig()
    assert cfg.reference.cache_dir == "~/.cache/preftune/reference" and cfg.data.tokenized_cache_dir == "~/.cache/preftune/tokenized"

"""training/sharding.py in one process: what is refused before anything starts, and which modules
become FSDP units. Sharded training itself runs in tests/test_distributed.py (2 processes, gloo)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from preftune.config.schema import TrainConfig
from preftune.errors import ConfigError
from preftune.training.sharding import check_supported, decoder_layers, part_of


def test_what_sharding_does_not_run_yet_is_refused_in_one_message() -> None:
    fsdp = TrainConfig(sharding="fsdp")
    check_supported(fsdp, processes=2)
    check_supported(replace(TrainConfig(), compile=True), processes=1)  # unsharded: nothing to check
    with pytest.raises(ConfigError, match=r"^train.sharding=fsdp: it needs several processes.*train.compile=true is not combined"):
        check_supported(replace(fsdp, compile=True), processes=1)


def test_each_decoder_layer_is_a_unit_and_a_part_of_a_state_dict_is_keyed_as_its_own(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from preftune.models.scorers import SequenceLogps

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    scorer = SequenceLogps(model)
    assert decoder_layers(scorer) == list(model.model.layers)
    part = part_of(scorer.state_dict(), scorer, model)
    assert part.keys() == model.state_dict().keys()

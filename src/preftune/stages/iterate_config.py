"""`preftune iterate`'s configuration: the DPO sections each round trains with, the generation
settings of `preftune generate` for sampling, and the loop's own options.

It lives beside the stage rather than in :mod:`preftune.config.schema` because its ``generate`` section
is :class:`~preftune.eval.generate.GenerationSettings` itself (one set of defaults, one check), and
the generation module sits above the config layer.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from preftune.config.schema import DataConfig, DPOConfig, LossConfig, ModelConfig, ReferenceConfig, TrainConfig, load_config, validate
from preftune.errors import ConfigError
from preftune.eval.generate import GenerationSettings


@dataclass
class IterateOptions:
    """The loop: rounds, prompts, the judge, how pairs are made, which reference each round uses."""

    rounds: int = 2  # rounds of sample, score, pair, train, evaluate (may grow on resume)
    prompts: list[str] = field(default_factory=list)  # prompt files sampled from each round (any file `preftune generate` reads)
    eval_prompts: list[str] = field(default_factory=list)  # held-out prompt files for the per-round evaluation
    max_prompts: int | None = None  # at most this many training prompts per round
    max_eval_prompts: int | None = 64  # at most this many held-out prompts per evaluation
    eval_samples: int = 2  # samples per held-out prompt (temperature 1: judge score, win rate, KL)
    judge: str | None = None  # "module:function" or "file.py:function" scoring (prompt, completion) -> number
    reward_model: str | None = None  # or a reward model folder (`preftune rm`'s final/)
    pairing: Literal["best_worst", "gap"] = "best_worst"  # one pair per prompt, or every two samples above min_gap
    min_gap: float = 0.0  # a pair's scores must differ by more than this; equal scores never pair
    reference: Literal["initial", "previous"] = "initial"  # each round's DPO reference


@dataclass
class IterateConfig:
    """`preftune iterate`: R rounds of sample, score, pair, DPO, evaluate; round N in ``output_dir/round-N``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    data: DataConfig = field(default_factory=DataConfig)  # length limits and layout; the pairs are made each round
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/iterate"))  # each round's DPO
    generate: GenerationSettings = field(default_factory=lambda: GenerationSettings(num_samples=4, progress=False))
    iterate: IterateOptions = field(default_factory=IterateOptions)


def check(cfg: IterateConfig, where: str = "") -> None:
    """Every range check: the DPO sections' (as `preftune dpo` runs them), the generation settings', the loop's."""
    validate(cfg, where)
    try:
        cfg.generate.check()
    except ConfigError as err:
        raise ConfigError(where + str(err)) from None
    it, problems = cfg.iterate, []
    if it.rounds < 1:
        problems.append("iterate.rounds must be at least 1")
    if not it.prompts:
        problems.append("iterate.prompts must name at least one prompt file")
    if not it.eval_prompts:
        problems.append("iterate.eval_prompts must name at least one held-out prompt file")
    if bool(it.judge) == bool(it.reward_model):
        problems.append("name exactly one judge: iterate.judge (module:function scoring (prompt, completion)) or "
                        "iterate.reward_model (a reward model folder)")
    if cfg.generate.num_samples < 2:
        problems.append("generate.num_samples must be at least 2: pairs are made among each prompt's samples")
    for name in ("max_prompts", "max_eval_prompts"):
        value = getattr(it, name)
        if value is not None and value < 1:
            problems.append(f"iterate.{name} must be at least 1 (or null)")
    if it.eval_samples < 1:
        problems.append("iterate.eval_samples must be at least 1")
    if not (math.isfinite(it.min_gap) and it.min_gap >= 0):
        problems.append("iterate.min_gap must be >= 0")
    if cfg.data.train:
        problems.append("data.train must be empty: each round makes its own pairs from iterate.prompts")
    if cfg.model.lora.enabled:
        problems.append("model.lora.enabled: iterating LoRA policies is not supported yet (each round starts from the "
                        "previous round's full weights)")
    if cfg.train.resume_from not in (None, "latest"):
        problems.append("train.resume_from: an iteration continues with train.resume_from=latest (each round resumes from "
                        "its own checkpoints)")
    if problems:
        raise ConfigError(where + "; ".join(problems) + ".")


def load_iterate_config(path: str | Path | None, overrides: list[str] | None = None) -> IterateConfig:
    """The YAML file (if any) with dotted overrides on top, converted and checked."""
    return load_config(IterateConfig, path, overrides, check=check)


def round_config(cfg: IterateConfig, *, policy: str, reference: str, pairs: Path, output_dir: Path) -> DPOConfig:
    """The DPO config of one round: from ``policy``, against ``reference``, on that round's pairs."""
    return DPOConfig(model=dataclasses.replace(cfg.model, path=policy),
                     reference=dataclasses.replace(cfg.reference, path=reference),
                     data=dataclasses.replace(cfg.data, train=[str(pairs)]),
                     loss=dataclasses.replace(cfg.loss),
                     train=dataclasses.replace(cfg.train, output_dir=str(output_dir), resume_from=None, overwrite=False))

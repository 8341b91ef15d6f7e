"""The settings: every stage's config as typed dataclasses (``schema``), the conversion from plain data
and dotted overrides (``typed``), and TRL's setting names beside preftune's (``trl_names``).

The config classes and their loader are re-exported here: ``from preftune.config import DPOConfig, load_config``.
"""

from preftune.config.schema import (
    STAGES,
    DataConfig,
    DPOConfig,
    KTOConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    ReferenceConfig,
    RMConfig,
    SFTConfig,
    TrainConfig,
    build_config,
    load_config,
    validate,
)
from preftune.config.typed import from_dict, to_dict, to_yaml

__all__ = ["STAGES", "DataConfig", "DPOConfig", "KTOConfig", "LoraConfig", "LossConfig", "ModelConfig", "ReferenceConfig", "RMConfig",
           "SFTConfig", "TrainConfig", "build_config", "from_dict", "load_config", "to_dict", "to_yaml", "validate"]

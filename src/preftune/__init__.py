"""preftune: align causal language models with human preferences (DPO and its family).

From Python, one call per stage (:mod:`preftune.api`)::

    import preftune
    result = preftune.dpo(model, train_data=dataset, tokenizer=tokenizer, beta=0.1)

The command line is ``preftune VERB`` (:mod:`preftune.cli`). Importing this package is light:
the names below are loaded on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "dpo": "preftune.api", "sft": "preftune.api", "reward_model": "preftune.api", "kto": "preftune.api", "Result": "preftune.api",
    "iterate": "preftune.api", "IterationResult": "preftune.api", "sweep": "preftune.api", "IterateConfig": "preftune.stages.iterate_config",
    "DPOConfig": "preftune.config", "SFTConfig": "preftune.config", "RMConfig": "preftune.config", "KTOConfig": "preftune.config",
    "load_config": "preftune.config", "PreftuneError": "preftune.errors",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'preftune' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

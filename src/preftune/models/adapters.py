"""A LoRA policy's reference: the model as it starts, without a second copy of the base.

The reference of a preference run is the policy as the run starts (as in TRL). With LoRA that
is the base weights plus the adapter the policy starts with:

- a fresh adapter (every ``lora_B`` zero, peft's initialisation) adds nothing, so the policy
  with its adapter switched off *is* the model as it starts, at no cost;
- a trained adapter (an SFT-LoRA run continued with DPO: the usual two-step workflow) does add
  something; switching it off would give the model before SFT. The run then keeps a frozen copy
  of the adapter's weights as a second adapter, :data:`REFERENCE_ADAPTER` (a few MB), and scores
  the reference through it, as TRL's ``DPOTrainer`` does with its ``"ref"`` adapter.

:func:`adapter_is_zero` tells the two apart; :func:`add_reference_adapter` makes the copy;
:func:`using_adapter` scores through another adapter without touching ``requires_grad`` (peft's
``set_adapter`` would flip it, between a policy forward and its backward).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

#: The name of the frozen copy of a trained adapter (never saved with the policy)
REFERENCE_ADAPTER = "preftune_reference"


def active_adapter_name(peft_model: nn.Module) -> str:
    """The name of the (single) adapter the policy trains."""
    name = peft_model.active_adapter
    return name[0] if isinstance(name, list) else name


def adapter_is_zero(peft_model: nn.Module) -> bool:
    """Whether the active adapter adds exactly nothing: LoRA (without DoRA, saved modules or
    trainable tokens, whose fresh state is not 'off') with every ``lora_B`` zero. Anything else,
    another peft method included, counts as trained: its copy is always right."""
    name = active_adapter_name(peft_model)
    config = peft_model.peft_config[name]
    if str(getattr(config, "peft_type", "")).rsplit(".", 1)[-1] != "LORA":
        return False
    if getattr(config, "use_dora", False) or getattr(config, "modules_to_save", None) or getattr(config, "trainable_token_indices", None):
        return False
    found = False
    for param_name, param in peft_model.named_parameters():
        parts = param_name.split(".")
        if name in parts and any(part in ("lora_B", "lora_embedding_B") for part in parts):
            found = True
            if bool(param.detach().ne(0).any()):
                return False
    return found


def add_reference_adapter(peft_model: nn.Module) -> str:
    """A frozen copy of the active adapter, named :data:`REFERENCE_ADAPTER`; the active adapter
    (the one trained) stays active and trainable. Returns the copy's name."""
    name = active_adapter_name(peft_model)
    if REFERENCE_ADAPTER not in peft_model.peft_config:
        trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
        peft_model.add_adapter(REFERENCE_ADAPTER, peft_model.peft_config[name])
        params = dict(peft_model.named_parameters())
        with torch.no_grad():
            for param_name, param in params.items():
                if f".{name}." in param_name:
                    params[param_name.replace(f".{name}.", f".{REFERENCE_ADAPTER}.")].copy_(param)
        for param_name, param in params.items():  # peft's add_adapter may change what trains: put it back
            param.requires_grad_(param_name in trainable)
    return REFERENCE_ADAPTER


@contextmanager
def using_adapter(peft_model: nn.Module, adapter: str) -> Iterator[None]:
    """Every adapter layer of ``peft_model`` runs ``adapter`` inside the block, then what it ran before.

    Sets the layers' active adapter directly, as peft's ``set_adapter`` does, but leaves every
    ``requires_grad`` as it is."""
    layers = [module for module in peft_model.modules() if "_active_adapter" in vars(module) or hasattr(type(module), "_active_adapter")]
    before = [module._active_adapter for module in layers]
    try:
        for module in layers:
            module._active_adapter = [adapter]
        yield
    finally:
        for module, active in zip(layers, before, strict=True):
            module._active_adapter = active

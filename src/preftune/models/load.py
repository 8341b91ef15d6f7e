"""Load the policy, the reference and the tokenizer; LoRA; freezing; saving.

Loading is the real ``from_pretrained`` path on a local folder, safetensors only (pickled
``.bin`` weights can run code when loaded), and no remote code unless the config says so. Run
folders and checkpoints read as models are :mod:`preftune.models.runs`'.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preftune.config.schema import LoraConfig, ModelConfig
from preftune.errors import PreftuneError
from preftune.models.adapters import REFERENCE_ADAPTER
from preftune.models.scorers import causal_lm_of
from preftune.models.tokenizer import check_folder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_causal_lm(cfg: ModelConfig, path: str | None = None) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` on a local folder, safetensors only."""
    from transformers import AutoModelForCausalLM

    folder = check_folder(path or cfg.path, "model folder")
    if not any(folder.glob("*.safetensors")):
        found = sorted(p.name for p in folder.iterdir())[:8]
        raise PreftuneError(
            f"'{folder}' holds no .safetensors weights (found: {', '.join(found) or 'nothing'}); "
            "preftune loads safetensors only. Convert with model.save_pretrained(dir, safe_serialization=True)."
        )
    kwargs: dict[str, Any] = {
        "dtype": DTYPES[cfg.dtype],
        "use_safetensors": True,
        "trust_remote_code": cfg.trust_remote_code,
    }
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise PreftuneError(f"could not load a causal LM from '{folder}': {type(err).__name__}: {err}") from None
    except Exception as err:  # noqa: BLE001 - safetensors' own error for a damaged or cut file, and the like
        raise PreftuneError(f"could not load a causal LM from '{folder}' (a damaged or incomplete weights file?): "
                            f"{type(err).__name__}: {err}") from None
    return model


#: Why a sequence-classification model is refused, and what to pass instead
SEQ_CLS_HELP = ("preftune trains causal LMs (AutoModelForCausalLM); a reward model is that causal LM plus preftune's own "
                "scalar head (preftune rm's LM term, loss.lm_weight, needs the LM head a sequence-classification model "
                "lacks). Pass the causal LM instead (AutoModelForCausalLM.from_pretrained(...)); the trained reward model "
                "is also saved as an AutoModelForSequenceClassification(num_labels=1) in final/seq_cls/.")


def check_causal_lm(model: nn.Module | None = None, folder: str | Path | None = None) -> None:
    """Refuse a sequence-classification model (TRL's RewardTrainer's input), in memory or as a
    model folder, before a run writes anything: loaded as a causal LM it has no LM head, and
    ``from_pretrained`` would make up a random one without a word."""
    if model is not None:
        lm = causal_lm_of(model)
        name = type(lm).__name__
        if name.endswith(("ForSequenceClassification", "ForTokenClassification")) or (
                hasattr(lm, "get_output_embeddings") and lm.get_output_embeddings() is None):
            raise PreftuneError(f"model is a {name}, not a causal LM with an LM head: {SEQ_CLS_HELP}")
    if folder:
        config = Path(folder).expanduser() / "config.json"
        try:
            architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
        except (OSError, ValueError, AttributeError):
            return  # a missing or unreadable folder is reported where it is loaded
        if architectures and all(str(a).endswith(("ForSequenceClassification", "ForTokenClassification")) for a in architectures):
            raise PreftuneError(f"'{folder}' holds a {architectures[0]}, not a causal LM: {SEQ_CLS_HELP}")


def check_vocabulary(model: nn.Module, rows: Any, where: str) -> None:
    """Every token id of the data must have a row in the model's embedding (a tokenizer larger than
    its model would index past it, deep inside torch)."""
    from preftune.data.store import max_token_id

    size = causal_lm_of(model).get_input_embeddings().num_embeddings
    highest = max_token_id(rows)
    if highest >= size:
        raise PreftuneError(f"the {where} hold token id {highest}, but the model's vocabulary has {size} rows: the tokenizer "
                            "does not belong to this model (or its added tokens were never given embeddings: "
                            "model.resize_token_embeddings).")


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap ``model`` with LoRA adapters; only the adapters are trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as err:
        raise PreftuneError(f"could not add LoRA adapters: {err}") from None


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode (dropout off) and no gradients: what a reference model must be."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass. Non-reentrant checkpointing
    works with frozen inputs (LoRA) and with autocast. transformers 5.25 renamed the call to
    ``activation_checkpointing_enable`` (the old name warns, and goes in v6); older releases have
    only ``gradient_checkpointing_enable``."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    model.config.use_cache = False


def load_policy(cfg: ModelConfig, model: nn.Module | None = None) -> nn.Module:
    """The trainable policy: loaded (or ``model``, already loaded, trained in place), LoRA-wrapped
    when asked (a model that already carries adapters keeps them), checkpointing when asked."""
    if model is None:
        model = load_causal_lm(cfg)
    elif not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise PreftuneError(f"model must be a transformers PreTrainedModel or a peft PeftModel, got {type(model).__name__}")
    model.config.use_cache = False
    if cfg.lora.enabled and not has_adapter(model):
        model = apply_lora(model, cfg.lora)
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def disable_dropout(model: nn.Module) -> None:
    """Every dropout off (modules, LoRA's included, and the config's rates that attention reads
    functionally): the policy's log-probs then depend on its weights alone, as TRL does by default."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for name in list(vars(config)) if config is not None else []:
        if name.endswith("dropout") and isinstance(getattr(config, name), float):
            setattr(config, name, 0.0)


def has_adapter(model: nn.Module | None) -> bool:
    """Whether ``model`` is a peft model (its adapter can be switched off to give the reference)."""
    return model is not None and hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def unsharded_replica(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """An empty plain copy of the causal LM ``model`` (its config, its LoRA adapters by name), built
    on the CPU in ``dtype``, for a sharded run's gathered weights to be loaded into (``load_state_dict``
    with the model's own keys): what cannot be done to the shards themselves (merging an adapter,
    exporting a reward model) is done to it."""
    from transformers import AutoModelForCausalLM

    if not has_adapter(model):
        return AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    from peft import get_peft_model

    names = list(model.peft_config)
    base = AutoModelForCausalLM.from_config(model.get_base_model().config, dtype=dtype)
    replica = get_peft_model(base, model.peft_config[names[0]], adapter_name=names[0])
    for name in names[1:]:
        replica.add_adapter(name, model.peft_config[name])
    return replica


def save_policy(policy: nn.Module, tokenizer: Any, folder: Path, *, merge: bool = False,
                state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """``save_pretrained`` (safetensors) + tokenizer; with LoRA the adapter, and merged weights on request.
    ``state_dict``: the weights to write instead of the model's own (a sharded run's, gathered; merged
    through an :func:`unsharded_replica`)."""
    folder.mkdir(parents=True, exist_ok=True)
    if has_adapter(policy):  # the trained adapter only: a frozen reference copy is not part of the model
        extra = {"state_dict": state_dict} if state_dict is not None else {}
        policy.save_pretrained(str(folder), safe_serialization=True,
                               selected_adapters=[name for name in policy.peft_config if name != REFERENCE_ADAPTER], **extra)
    else:
        policy.save_pretrained(str(folder), safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(str(folder))
    if merge and hasattr(policy, "merge_and_unload"):
        import copy

        if state_dict is None:
            merged = copy.deepcopy(policy).merge_and_unload()
        else:
            merged = unsharded_replica(policy, next(iter(state_dict.values())).dtype)
            merged.load_state_dict(state_dict)
            merged = merged.merge_and_unload()
        merged.save_pretrained(str(folder / "merged"), safe_serialization=True)
        tokenizer.save_pretrained(str(folder / "merged"))

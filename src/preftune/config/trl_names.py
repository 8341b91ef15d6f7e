"""TRL's setting names, and what preftune calls the same thing: one table, used in error messages.

A user coming from TRL writes ``learning_rate`` or ``loss_type: sigmoid``; preftune answers with
its own name (``train.lr``, ``loss.name: dpo``) instead of a lookalike suggestion. The table
covers every field of TRL's ``DPOConfig`` that is its own (not inherited from transformers'
``TrainingArguments``), with ``None`` where preftune has no equivalent and why, and the
``TrainingArguments`` fields that have an equivalent. ``tests/test_trl_names.py`` checks it
against the installed TRL. The README lists it.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from preftune.errors import ConfigError

#: TRL field -> preftune key, or (None, why) where there is no equivalent.
TRL_NAMES: dict[str, str | tuple[None, str]] = {
    # DPOConfig's own fields
    "beta": "loss.beta",
    "label_smoothing": "loss.label_smoothing",
    "loss_type": "loss.name (a name, or a list; every TRL loss_type is accepted as written)",
    "max_length": "data.max_length",
    "truncation_mode": (None, "preftune keeps the end of a long prompt (data.max_prompt_length) and never empties a completion"),
    "trust_remote_code": "model.trust_remote_code",
    "model_init_kwargs": "model.dtype / model.attn_implementation",
    "disable_dropout": "model.disable_dropout",
    "dataset_num_proc": (None, "tokenization runs in one process"),
    "padding_free": "data.prefix_sharing",
    "pad_to_multiple_of": (None, "batches pad to their longest row, grouped by length (data.group_by_length)"),
    "precompute_ref_log_probs": "reference.strategy=cache",
    "precompute_ref_batch_size": "train.eval_batch_size",
    "loss_weights": "loss.weights (with loss.name a list: [dpo, bco, sft])",
    "ld_alpha": "loss.ld_alpha",
    "f_divergence_type": "loss.f_divergence_type",
    "f_alpha_divergence_coef": "loss.f_alpha_divergence_coef",
    "use_weighting": "loss.use_weighting",
    "discopop_tau": "loss.discopop_tau",
    "activation_offloading": (None, "not implemented; model.gradient_checkpointing saves activation memory"),
    "sync_ref_model": "reference.sync_ref_model (reference.strategy=copy)",
    "ref_model_mixup_alpha": "reference.ref_model_mixup_alpha",
    "ref_model_sync_steps": "reference.ref_model_sync_steps",
    "router_aux_loss_coef": (None, "mixture-of-experts auxiliary losses are not added"),
    "pad_token": (None, "the tokenizer's pad token, else its EOS (padding is masked by position)"),
    # TrainingArguments fields with an equivalent
    "output_dir": "train.output_dir",
    "learning_rate": "train.lr",
    "per_device_train_batch_size": "train.batch_size",
    "per_device_eval_batch_size": "train.eval_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "num_train_epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "weight_decay": "train.weight_decay",
    "adam_beta1": "train.adam_betas[0]",
    "adam_beta2": "train.adam_betas[1]",
    "adam_epsilon": "train.adam_eps",
    "max_grad_norm": "train.max_grad_norm",
    "lr_scheduler_type": "train.scheduler",
    "warmup_steps": "train.warmup_steps",
    "logging_steps": "train.log_every",
    "eval_steps": "train.eval_every",
    "save_steps": "train.save_every",
    "save_total_limit": "train.save_total_limit",
    "resume_from_checkpoint": "train.resume_from",
    "seed": "train.seed",
    "full_determinism": "train.deterministic",
    "bf16": "train.bf16 (default null: auto, bf16 where the device has bf16 matrix units and the model >= 5M parameters)",
    "torch_compile": "train.compile (default auto: on under CUDA, on CPU for long runs of large enough models; true/false)",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "optim": "train.optimizer",
    "disable_tqdm": "train.progress (inverted)",
    "report_to": "train.report_to",
    "run_name": "train.run_name",
    "eval_strategy": "train.eval_every (a number of steps; null: no evaluation)",
    "save_strategy": "train.save_every (a number of steps; null: no checkpoints)",
    "logging_strategy": "train.log_every (a number of steps)",
}

#: TRL's trainer and script arguments (not DPOConfig fields) -> what preftune takes instead.
TRL_ARGUMENTS: dict[str, str] = {
    "train_dataset": "train_data= in Python (a Dataset, DatasetDict, list of dicts or path), data.train in a config",
    "eval_dataset": "eval_data= in Python, data.eval in a config",
    "processing_class": "tokenizer= in Python (processing_class= is accepted too), model.tokenizer (a folder) in a config",
    "peft_config": "model.lora.* (enabled, r, alpha, dropout, target_modules); in Python peft_config=LoraConfig(...) is accepted too",
    "dataset_name": "data.train (a hub id or a local path)",
    "use_peft": "model.lora.enabled=true",
    "model_name_or_path": "model.path",
    "lora_r": "model.lora.r",
    "lora_alpha": "model.lora.alpha",
    "lora_dropout": "model.lora.dropout",
    "lora_target_modules": "model.lora.target_modules",
}

#: TRL settings with no equivalent that would not change what a run computes: listed, not refused.
HARMLESS = {"dataset_num_proc", "pad_to_multiple_of", "activation_offloading", "pad_token"}
#: TrainingArguments fields outside the table that change results: a TRL config setting one is refused.
CHANGES_RESULTS = {"fp16", "label_smoothing_factor", "lr_scheduler_kwargs", "optim_args", "neftune_noise_alpha",
                   "train_sampling_strategy", "data_seed", "tf32"}

#: TRL's loss_type values -> preftune's loss.name (paper names, not shapes).
#: Every one is also accepted as written (preftune.losses.TRL_ALIASES); preftune's own name is what it logs and documents.
TRL_LOSS_TYPES = {
    "sigmoid": "dpo", "ipo": "ipo", "hinge": "hinge", "robust": "robust", "exo_pair": "exo", "nca_pair": "nca", "bco_pair": "bco",
    "sppo_hard": "sppo", "aot": "aot", "aot_unpaired": "aot_unpaired", "apo_zero": "apo_zero", "apo_down": "apo_down",
    "discopop": "discopop", "sft": "sft", "sigmoid_norm": "dpo_norm",
}


def trl_hint(key: str) -> str | None:
    """A sentence naming preftune's equivalent of TRL's ``key`` (its last dotted part), or None."""
    name = key.rpartition(".")[2]
    if name in TRL_ARGUMENTS:
        return f" '{name}' is TRL's; preftune's is {TRL_ARGUMENTS[name]}."
    target = TRL_NAMES.get(name)
    if target is None:
        return None
    if isinstance(target, tuple):
        return f" '{name}' is TRL's setting; preftune has no equivalent: {target[1]}."
    return f" '{name}' is TRL's name; preftune's is '{target}'."


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def from_trl_config(config: Any) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """A TRL config object (``trl.DPOConfig`` and the like) -> (preftune's sections, the TRL
    fields set with no equivalent, ignored). Only the fields set away from TRL's defaults are
    carried over; one with no equivalent that changes results is refused (:class:`ConfigError`)."""
    sections: dict[str, dict[str, Any]] = {}
    ignored, refused = [], []
    for f in dataclasses.fields(config):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        value = _plain(getattr(config, f.name))
        if value == _plain(default) or f.name not in TRL_NAMES and f.name not in CHANGES_RESULTS:
            if value != _plain(default) and f.name not in TRL_NAMES:
                ignored.append(f.name)
            continue
        target = TRL_NAMES.get(f.name)
        if not isinstance(target, str):
            (ignored if f.name in HARMLESS else refused).append(f.name)
            continue
        converted = _convert(f.name, value, target)
        if converted is None:
            refused.append(f"{f.name}={value!r}")
            continue
        for key, item in converted.items():
            section, _, name = key.partition(".")
            sections.setdefault(section, {})[name] = item
    if {"adam_beta1", "adam_beta2"} & {f.name for f in dataclasses.fields(config)}:
        betas = [config.adam_beta1, config.adam_beta2]
        if betas != [0.9, 0.999]:
            sections.setdefault("train", {})["adam_betas"] = betas
    if refused:
        raise ConfigError(f"the TRL config sets {', '.join(refused)}, which preftune has no equivalent for and which change what "
                          "a run computes; unset them, or write a preftune config (see the README's table of TRL names).")
    return sections, sorted(ignored)


def _convert(name: str, value: Any, target: str) -> dict[str, Any] | None:
    """One TRL field's value as preftune's ``{dotted key: value}``; None when it cannot be said."""
    key = target.split(" ")[0]
    if name == "loss_type":
        names = value if isinstance(value, list) else [value]
        if not all(n in TRL_LOSS_TYPES for n in names):
            return None
        return {"loss.name": TRL_LOSS_TYPES[names[0]] if len(names) == 1 else [TRL_LOSS_TYPES[n] for n in names]}
    if name in ("eval_strategy", "save_strategy", "logging_strategy"):
        return {key: None} if value == "no" and name != "logging_strategy" else ({} if value == "steps" else None)
    if name in ("adam_beta1", "adam_beta2"):
        return {}  # both at once, below
    if name == "precompute_ref_log_probs":
        return {"reference.strategy": "cache"} if value else {}
    if name == "disable_tqdm":
        return {"train.progress": not value}
    if name == "report_to":
        return {key: [] if value in ("none", ["none"]) else list(value) if isinstance(value, list) else [value]}
    if name == "model_init_kwargs":
        dtype = str((value or {}).get("dtype", "")).removeprefix("torch.")
        return {"model.dtype": dtype} if set(value or {}) == {"dtype"} and dtype in ("float32", "bfloat16", "float16") else None
    if name in ("optim", "lr_scheduler_type"):
        plain = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "sgd": "sgd", "rmsprop": "rmsprop"}.get(value, value)
        return {key: plain} if plain in ("adamw", "sgd", "rmsprop", "constant", "linear", "cosine") else None
    return {key: value}

"""TRL's setting names, and what preftune calls the same thing: one table, used in error messages.

A user coming from TRL writes ``learning_rate`` or ``loss_type: sigmoid``; preftune answers with
its own name (``train.lr``, ``loss.name: dpo``) instead of a lookalike suggestion. The table
covers every field of TRL's ``DPOConfig`` that is its own (not inherited from transformers'
``TrainingArguments``), with ``None`` where preftune has no equivalent and why, and the
``TrainingArguments`` fields that have an equivalent. ``tests/test_trl_names.py`` checks it
against the installed TRL. The README lists it.
"""

from __future__ import annotations

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
}

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
    target = TRL_NAMES.get(name)
    if target is None:
        return None
    if isinstance(target, tuple):
        return f" '{name}' is TRL's setting; preftune has no equivalent: {target[1]}."
    return f" '{name}' is TRL's name; preftune's is '{target}'."

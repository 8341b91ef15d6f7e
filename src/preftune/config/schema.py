"""Typed configuration for every stage: YAML in, dotted overrides, resolved YAML out.

Defaults live here and nowhere else. A config file is plain data (``yaml.safe_load``); an
unknown key is an error naming the nearest valid key; a value of the wrong type is an error
naming the key and the expected type. ``--train.lr=1e-6`` style overrides are applied on top
of the file before conversion, so they are checked the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from preftune.config.loss_check import loss_problems
from preftune.config.trl_names import trl_hint
from preftune.config.typed import from_dict, merge_nested, parse_overrides, to_dict, to_yaml
from preftune.config.yamlfile import read_yaml
from preftune.errors import ConfigError

__all__ = ["STAGES", "DPOConfig", "DataConfig", "KTOConfig", "KTOLossConfig", "KTOOptions", "LoraConfig", "LossConfig",
           "ModelConfig", "RMConfig", "RMLossConfig", "ReferenceConfig", "SFTConfig", "SFTOptions", "SweepConfig", "TrainConfig",
           "build_config", "from_dict", "load_config", "parse_overrides", "to_dict", "to_yaml", "validate"]


#: train.report_to's trackers -> the package each needs (preftune.training.trackers starts them)
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


# --------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    """Where the preference data comes from and how it is cut to fit."""

    train: list[str] = field(default_factory=list)  # files, `datasets` folders, hub-layout folders or hub dataset ids
    eval: list[str] = field(default_factory=list)  # held-out files; else see eval_fraction
    # hub dataset ids and hub-layout folders (a README card and data files): which config, splits, files
    subset: str | None = None  # hub data: the dataset's config name (load_dataset's `name`)
    train_split: str = "train"  # hub data: the split data.train reads
    eval_split: str = "test"  # hub data: the split data.eval reads
    data_files: dict[str, str] = field(default_factory=dict)  # hub data: split -> file pattern, as load_dataset's data_files
    format: Literal["auto", "explicit", "conversational", "hh", "votes", "unpaired"] = "auto"  # auto: detected from the first record
    columns: dict[str, str] = field(default_factory=dict)  # our field name -> the file's name
    system: str | None = None  # a default system prompt for every record
    # pairs of whole texts (chosen and rejected hold the prompt too): split after the last marker
    prompt_marker: str = "\n\nAssistant:"
    on_error: Literal["error", "skip"] = "error"  # a malformed record stops the run, or is counted
    on_overflow: Literal["drop", "error"] = "drop"  # a record that cannot fit max_length
    max_length: int = 1024  # prompt + completion tokens
    max_prompt_length: int | None = 512  # long prompts keep their end
    eval_fraction: float = 0.0  # held out from train (seeded) when `eval` is empty
    max_records: int | None = None  # read at most this many records per file
    group_by_length: bool = True  # batches of similar length: less padding
    # DPO: one `prompt | chosen | rejected` row per pair, the prompt encoded once (needs an
    # attention that takes a 4D mask, sdpa or eager; otherwise the plain layout is used, said on
    # stderr and in reference.json)
    prefix_sharing: bool = True
    # tokenized local files cached here, keyed by their bytes, the tokenizer and the settings above
    # (preftune.data.cache); null: off, every run tokenizes
    tokenized_cache_dir: str | None = "~/.cache/preftune/tokenized"


@dataclass
class LoraConfig:
    """Low-rank adapters through `peft` (off by default)."""

    enabled: bool = False  # train a LoRA adapter instead of every weight
    r: int = 16  # the adapters' rank (peft's r)
    alpha: int = 32  # the adapters' scale numerator (peft's lora_alpha; the update is scaled by alpha / r)
    dropout: float = 0.0  # dropout on the adapters' input (peft's lora_dropout)
    target_modules: list[str] = field(  # the modules that get an adapter (peft's target_modules)
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    merge_on_save: bool = False  # also write merged full weights to final/merged


@dataclass
class ModelConfig:
    """The policy: a causal LM in a local folder."""

    path: str = ""  # a model folder (save_pretrained's layout) or a hub model id
    tokenizer: str | None = None  # defaults to `path`
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # the dtype the weights are loaded in (train.bf16 is autocast)
    trust_remote_code: bool = False  # run the model folder's own Python (only when you trust it)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, more compute
    disable_dropout: bool = True  # dropout off in the policy while it trains (TRL's default too): log-probs are deterministic
    attn_implementation: str | None = None  # e.g. "sdpa" or "eager"; None lets transformers pick
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class ReferenceConfig:
    """Where reference log-probs come from.

    ``auto`` picks ``none`` for reference-free losses, ``adapter`` with LoRA, else ``copy``; the
    reference is then always the model as the run starts (a trained LoRA adapter is kept as a
    frozen copy). ``adapter`` asked for explicitly is the base model with the adapter off.
    """

    strategy: Literal["auto", "copy", "adapter", "cache", "none"] = "auto"  # see the section's text above
    path: str | None = None  # reference model folder; defaults to model.path
    cache_dir: str = "~/.cache/preftune/reference"  # strategy cache: log-probs stored here, keyed by weights, tokenizer, data, precision
    sync_ref_model: bool = False  # TR-DPO: move the reference towards the policy every ref_model_sync_steps (copy strategy only)
    ref_model_mixup_alpha: float = 0.6  # TR-DPO: ref <- alpha * policy + (1 - alpha) * ref; 1.0 replaces it (hard update)
    ref_model_sync_steps: int = 512  # TR-DPO: optimizer steps between syncs


@dataclass
class LossConfig:
    """The objective and its hyperparameters (each loss reads only the ones it takes; TRL's names and defaults)."""

    name: str | list[str] = "dpo"  # a loss (paper name or TRL's loss_type), or a list summed with weights
    weights: list[float] | None = None  # one per loss in a list (TRL's loss_weights; default all 1)
    beta: float = 0.1  # the strength of the pull towards the reference (the inverse temperature of the implicit reward)
    label_smoothing: float = 0.0  # dpo: conservative DPO; robust: the label flip rate; exo: epsilon (> 0); aot: smoothing
    normalize: bool = False  # ipo: per-token (length-averaged) log-probs, as TRL does
    gamma: float = 0.5  # simpo: target reward margin
    lambda_: float = 0.1  # orpo: weight of the odds-ratio term
    discopop_tau: float = 0.05  # discopop: temperature of the log-ratio modulation
    f_divergence_type: str = "reverse_kl"  # f-DPO: reverse_kl, forward_kl, js_divergence, alpha_divergence
    f_alpha_divergence_coef: float = 0.5  # f-DPO's alpha (alpha_divergence only)
    dpop_lambda: float = 50.0  # dpop: weight of the penalty on a chosen likelihood below the reference's
    rdpo_alpha: float = 0.01  # rdpo: length regularisation per token of length difference
    use_weighting: bool = False  # WPO: weight each pair by its completions' aligned probabilities (not aot)
    ld_alpha: float | None = None  # LD-DPO: weight of the tokens beyond the pair's shared length, in [0, 1] (null: off)
    desirable_weight: float = 1.0  # kto
    undesirable_weight: float = 1.0  # kto
    nll_alpha: float = 0.0  # weight of an NLL term on the chosen completion (0 = off)


@dataclass
class TrainConfig:
    """The one training loop's settings, shared by every stage."""

    output_dir: str = "runs/dpo"  # the run's folder (config, metrics, checkpoints, final model, report)
    seed: int = 42  # seeds Python and torch (all devices), the data order and the held-out split (data.eval_fraction)
    deterministic: bool = False  # deterministic kernels (bitwise-reproducible CUDA runs; slower)
    epochs: int = 1  # passes over the training data (unless max_steps is set)
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 8  # pairs per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    optimizer: Literal["adamw", "rmsprop", "sgd"] = "adamw"  # adamw is fused where torch has the kernel; sgd: plain
    lr: float = 1e-6  # the peak learning rate
    weight_decay: float = 0.0  # decoupled weight decay (AdamW), L2 otherwise
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW's beta1 and beta2
    adam_eps: float = 1e-8  # AdamW's epsilon
    scheduler: Literal["constant", "linear", "cosine"] = "linear"  # after warmup: constant, or a linear or cosine decay to 0
    warmup_steps: int = 0  # optimizer steps of linear warmup up to lr
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    max_grad_norm: float | None = 1.0  # clip the gradient's global norm to this; null: no clipping
    bf16: bool | None = None  # bf16 autocast; null (auto): bf16 units (CUDA; CPU AMX/avx512_bf16) and >= 5M parameters (training/precision.py)
    sharding: Literal["none", "fsdp"] = "none"  # fsdp: torch's FSDP2 (fully_shard) over the processes (training/sharding.py); none: DDP
    compile: bool | Literal["auto"] = "auto"  # torch.compile (inductor) of the decoder layers; auto: CUDA, long CPU runs (training/compile_choice.py)
    log_every: int = 10  # optimizer steps between lines of metrics.jsonl
    eval_every: int | None = None  # optimizer steps; None = only at the end
    eval_batch_size: int | None = None  # defaults to batch_size
    save_every: int | None = None  # checkpoint every N optimizer steps
    save_total_limit: int | None = None  # keep only the newest N checkpoints
    resume_from: str | None = None  # a checkpoint folder, or "latest"
    overwrite: bool = False  # replace a run already in output_dir (else: refused, or continued with resume_from)
    report_to: list[str] = field(default_factory=list)  # experiment trackers: tensorboard, wandb, mlflow
    project: str = "preftune"  # the W&B project / MLflow experiment
    run_name: str | None = None  # the tracker's run name; default: the output folder's name
    tensorboard: bool = False  # the same as report_to including tensorboard
    progress: bool = True  # progress bars on stderr (tokenization, reference pass, evaluation, generation)
    logprob_chunk_size: int = 1024  # tokens per chunk of the output projection
    report: bool = True  # write report.html (training curves) at the end

    def __post_init__(self) -> None:
        if list(self.report_to) == ["none"]:  # TRL's way to say: no trackers
            self.report_to = []


@dataclass
class SweepConfig:
    """`preftune dpo --sweep`: the judge of every swept policy's samples against the reference's, on
    the held-out prompts (as `preftune eval` takes one); its score is what the sweep's frontier
    plots against KL. Without one, the frontier shows the beta-free log-ratio margin and the held-out
    accuracy, which are not rewards. Read by --sweep only: a single run refuses it."""

    judge: str | None = None  # "module:function" or "file.py:function": (prompt, policy_response, reference_response) -> [0, 1]
    reward_model: str | None = None  # a reward model folder (`preftune rm`): the higher reward wins; its mean reward is plotted


@dataclass
class DPOConfig:
    """`preftune dpo`: the preference-loss family (paired losses)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


@dataclass
class SFTOptions:
    """Supervised fine-tuning specifics."""

    packing: bool = False  # several short examples per row, kept apart by a block attention mask


@dataclass
class SFTConfig:
    """`preftune sft`: next-token loss on completions (prompt tokens masked)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTOptions = field(default_factory=SFTOptions)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/sft", lr=1e-5))


@dataclass
class RMLossConfig:
    """Reward-model objective: Bradley-Terry + lm_weight * LM loss on chosen + centring."""

    lm_weight: float = 1.0  # weight of the next-token loss on the chosen completion
    center_weight: float = 0.0  # weight of mean((r_chosen + r_rejected)^2): keeps rewards near 0
    use_margin: bool = True  # subtract the data's `margin` field inside the sigmoid


@dataclass
class RMConfig:
    """`preftune rm`: a scalar reward head on a causal LM, trained on preference pairs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: RMLossConfig = field(default_factory=RMLossConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/rm", lr=1e-5))


@dataclass
class KTOLossConfig:
    """KTO's objective (Ethayarajh et al. 2024): beta and the weights of the two kinds of example."""

    beta: float = 0.1  # as DPO's beta: the pull towards the reference
    desirable_weight: float = 1.0  # the loss weight of desirable records
    undesirable_weight: float = 1.0  # the loss weight of undesirable records

    @property
    def name(self) -> str:  # what the reference and the loss registry call it
        return "kto"


@dataclass
class KTOOptions:
    """KTO's data: unpaired records (prompt, completion, label)."""

    split_pairs: bool = False  # also take preference pairs, each as a desirable and an undesirable record


@dataclass
class KTOConfig:
    """`preftune kto`: KTO on unpaired (thumbs-up / thumbs-down) feedback."""

    model: ModelConfig = field(default_factory=ModelConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: KTOLossConfig = field(default_factory=KTOLossConfig)
    kto: KTOOptions = field(default_factory=KTOOptions)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/kto", lr=5e-7))


STAGES: dict[str, type] = {"dpo": DPOConfig, "sft": SFTConfig, "rm": RMConfig, "kto": KTOConfig}


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None,
                check: Callable[[Any, str], None] | None = None) -> Any:
    """Read a YAML file (if given), apply dotted overrides, convert and validate (with ``check``
    in place of :func:`validate` for a config that has more to check, such as iterate's)."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    data = merge_nested(data, parse_overrides(overrides or [], cls, hint=trl_hint))
    return build_config(cls, data, where=f"{path}: " if path is not None else "", check=check)


def build_config(cls: type, data: dict[str, Any], *, where: str = "", check: Callable[[Any, str], None] | None = None) -> Any:
    """The config ``cls`` from plain nested data, with every check a YAML file gets (keys, types,
    ranges); a TRL setting name is answered with preftune's. ``where`` prefixes each message."""
    try:
        cfg = from_dict(cls, data, hint=trl_hint)
    except ConfigError as err:
        raise ConfigError(where + str(err)) from None
    (check or validate)(cfg, where)
    return cfg


def validate(cfg: Any, where: str = "") -> None:
    """Range checks that types alone cannot express, for every section ``cfg`` has.

    The one place they live: :func:`load_config` runs them on YAML and overrides, and every
    stage runs them again on the config it is given, so a config built in Python meets the
    same errors.
    """
    problems: list[str] = []
    for name, section in vars(cfg).items():
        check = _CHECKS.get(type(section))
        if check is not None:
            problems.extend(f"{name}.{problem}" for problem in check(section))
    if isinstance(cfg, DPOConfig) and "kto" in ([cfg.loss.name] if isinstance(cfg.loss.name, str) else cfg.loss.name):
        problems.append("loss.name=kto trains on unpaired data: use `preftune kto` (preftune.kto from Python)")
    if isinstance(cfg, KTOConfig) and cfg.reference.sync_ref_model:
        problems.append("reference.sync_ref_model (TR-DPO) is for `preftune dpo`; KTO's reference stays the model as the run starts")
    if getattr(cfg, "reference", None) is not None and cfg.reference.sync_ref_model and cfg.train.resume_from:
        problems.append("reference.sync_ref_model cannot resume a run: checkpoints hold the policy, not the moved reference")
    if isinstance(cfg, KTOConfig) and cfg.train.batch_size < 2:
        problems.append("train.batch_size must be at least 2 for KTO: its KL baseline is a mean over the micro-batch")
    if problems:
        raise ConfigError(where + "; ".join(problems) + ".")


def _data_problems(data: DataConfig) -> list[str]:
    problems = []
    if data.max_length < 2:
        problems.append("max_length must be at least 2")
    if data.max_prompt_length is not None and data.max_prompt_length < 1:
        problems.append("max_prompt_length must be at least 1 (or null)")
    if not 0.0 <= data.eval_fraction < 1.0:
        problems.append("eval_fraction must be in [0, 1)")
    if data.max_records is not None and data.max_records < 1:
        problems.append(f"max_records must be at least 1 (or null), got {data.max_records}")
    return problems


def _train_problems(train: TrainConfig) -> list[str]:
    problems = [] if str(train.output_dir).strip() else ["output_dir is empty: name the run's folder (it would be the current one)"]
    if not 0 <= train.seed < 2**32:
        problems.append(f"seed must be in [0, 2**32) (got {train.seed})")
    for name in ("batch_size", "grad_accum", "epochs", "log_every", "logprob_chunk_size"):
        if getattr(train, name) < 1:
            problems.append(f"{name} must be at least 1")
    for name in ("max_steps", "eval_every", "save_every", "save_total_limit", "eval_batch_size"):
        value = getattr(train, name)
        if value is not None and value < 1:
            problems.append(f"{name} must be at least 1 (or null)")
    unknown = [name for name in train.report_to if name not in TRACKERS]
    if unknown:
        problems.append(f"report_to: unknown tracker(s) {', '.join(map(repr, unknown))} (known: {', '.join(TRACKERS)})")
    if not (math.isfinite(train.lr) and train.lr > 0):
        problems.append("lr must be positive (and finite)")
    if train.warmup_steps < 0:
        problems.append("warmup_steps must be >= 0")
    if not 0.0 <= train.warmup_ratio < 1.0:
        problems.append("warmup_ratio must be in [0, 1)")
    if len(train.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in train.adam_betas):
        problems.append("adam_betas must be two values in [0, 1)")
    if not (math.isfinite(train.adam_eps) and train.adam_eps > 0):
        problems.append("adam_eps must be a positive number")
    if not (math.isfinite(train.weight_decay) and train.weight_decay >= 0):
        problems.append("weight_decay must be >= 0")
    if train.max_grad_norm is not None and not (math.isfinite(train.max_grad_norm) and train.max_grad_norm > 0):
        problems.append("max_grad_norm must be positive (or null for no clipping)")
    return problems


def _reference_problems(reference: ReferenceConfig) -> list[str]:
    problems = []
    if not 0.0 < reference.ref_model_mixup_alpha <= 1.0:
        problems.append("ref_model_mixup_alpha must be in (0, 1] (1: replace the reference by the policy)")
    if reference.ref_model_sync_steps < 1:
        problems.append("ref_model_sync_steps must be at least 1")
    return problems


def _kto_loss_problems(loss: KTOLossConfig) -> list[str]:
    problems = [] if loss.beta > 0 else ["beta must be positive"]
    return problems + [f"{name} must be positive" for name in ("desirable_weight", "undesirable_weight") if not getattr(loss, name) > 0]


def _rm_loss_problems(loss: RMLossConfig) -> list[str]:
    return [f"{name} must be >= 0" for name in ("lm_weight", "center_weight") if getattr(loss, name) < 0]


_CHECKS = {DataConfig: _data_problems, TrainConfig: _train_problems, LossConfig: loss_problems,
           RMLossConfig: _rm_loss_problems, KTOLossConfig: _kto_loss_problems, ReferenceConfig: _reference_problems}

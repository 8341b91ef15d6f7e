"""Typed configuration for every stage: YAML in, dotted overrides, resolved YAML out.

Defaults live here and nowhere else. A config file is plain data (``yaml.safe_load``); an
unknown key is an error naming the nearest valid key; a value of the wrong type is an error
naming the key and the expected type. ``--train.lr=1e-6`` style overrides are applied on top
of the file before conversion, so they are checked the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from preftune.errors import ConfigError


# --------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    """Where the preference data comes from and how it is cut to fit."""

    train: list[str] = field(default_factory=list)  # files or `datasets` folders
    eval: list[str] = field(default_factory=list)  # held-out files; else see eval_fraction
    format: Literal["auto", "explicit", "conversational", "hh", "votes", "unpaired"] = "auto"
    columns: dict[str, str] = field(default_factory=dict)  # our field name -> the file's name
    system: str | None = None  # a default system prompt for every record
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


@dataclass
class LoraConfig:
    """Low-rank adapters through `peft` (off by default)."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    merge_on_save: bool = False  # also write merged full weights to final/merged


@dataclass
class ModelConfig:
    """The policy: a causal LM in a local folder."""

    path: str = ""
    tokenizer: str | None = None  # defaults to `path`
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None  # e.g. "sdpa" or "eager"; None lets transformers pick
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class ReferenceConfig:
    """Where reference log-probs come from.

    ``auto`` picks ``none`` for reference-free losses, ``adapter`` with LoRA, else ``copy``.
    """

    strategy: Literal["auto", "copy", "adapter", "cache", "none"] = "auto"
    path: str | None = None  # reference model folder; defaults to model.path
    cache_dir: str = ".preftune-cache/reference"


@dataclass
class LossConfig:
    """The objective and its hyperparameters (each loss reads only the ones it takes)."""

    name: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0  # dpo: conservative DPO; robust: the label flip rate
    normalize: bool = False  # ipo: per-token (length-averaged) log-probs, as TRL does
    gamma: float = 0.5  # simpo: target reward margin
    lambda_: float = 0.1  # orpo: weight of the odds-ratio term
    desirable_weight: float = 1.0  # kto
    undesirable_weight: float = 1.0  # kto
    nll_alpha: float = 0.0  # weight of an NLL term on the chosen completion (0 = off)


@dataclass
class TrainConfig:
    """The one training loop's settings, shared by every stage."""

    output_dir: str = "runs/dpo"
    seed: int = 42
    deterministic: bool = False  # deterministic kernels (bitwise-reproducible CUDA runs; slower)
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 8  # pairs per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    optimizer: Literal["adamw", "rmsprop", "sgd"] = "adamw"  # adamw is fused where torch has the kernel; sgd: plain
    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    scheduler: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    max_grad_norm: float | None = 1.0
    bf16: bool = False  # bf16 autocast
    log_every: int = 10
    eval_every: int | None = None  # optimizer steps; None = only at the end
    eval_batch_size: int | None = None  # defaults to batch_size
    save_every: int | None = None  # checkpoint every N optimizer steps
    save_total_limit: int | None = None  # keep only the newest N checkpoints
    resume_from: str | None = None  # a checkpoint folder, or "latest"
    tensorboard: bool = False
    progress: bool = True
    logprob_chunk_size: int = 1024  # tokens per chunk of the output projection
    report: bool = True  # write report.html (training curves) at the end


@dataclass
class DPOConfig:
    """`preftune dpo`: the preference-loss family (paired losses)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


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


STAGES: dict[str, type] = {"dpo": DPOConfig, "sft": SFTConfig, "rm": RMConfig}


# --------------------------------------------------------------------------- conversion
def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else f" Valid keys: {', '.join(options)}."


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert the few safe cases."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"'{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"'{key}': expected {_type_name(tp)}, got {value!r}.")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}': expected a mapping of {tp.__name__} settings, got {value!r}.")
        return from_dict(tp, value, prefix=key + ".")
    if origin is list:
        if isinstance(value, (str, int, float)) and args and args[0] is str:
            value = [value]  # `train: data.jsonl` means a list of one file
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}': expected a list, got {value!r}.")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}': expected a mapping, got {value!r}.")
        return {_convert(k, args[0], key): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}': expected true or false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{key}': expected an integer, got {value!r}.")
        return value
    if tp is float:
        # YAML 1.1 reads `1e-6` (no dot) as a string: accept any string Python reads as a float.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}': expected a number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"'{key}': expected a string, got {value!r}.")
        return str(value)
    if tp is Any:
        return value
    raise ConfigError(f"'{key}': unsupported config type {tp!r}")  # a bug in this module


def from_dict(cls: type, data: dict[str, Any], *, prefix: str = "") -> Any:
    """Build the dataclass ``cls`` from a plain mapping, checking keys and types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"unknown config key '{prefix}{key}'.{_closest(str(key), names)}")
        kwargs[key] = _convert(value, hints[key], prefix + key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data (every default written out)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, prefix + f.name + "."))
        else:
            keys.append(prefix + f.name)
    return keys


def parse_overrides(items: list[str], cls: type) -> dict[str, Any]:
    """Turn ``["--train.lr=1e-6", "--data.max_length", "512"]`` into a nested mapping.

    Values are read as YAML scalars (``true``, ``512``, ``[a, b]``, ``null``). A key that is
    not a config key is an error naming the closest one.
    """
    import yaml

    valid = _all_keys(cls)
    nested: dict[str, Any] = {}
    i = 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--"):
            raise ConfigError(f"unexpected argument '{item}': overrides look like --section.key=value.")
        body = item[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        elif i + 1 < len(items) and not items[i + 1].startswith("--"):
            key, raw = body, items[i + 1]
            i += 1
        else:
            raise ConfigError(f"override '{item}' has no value: write --{body}=VALUE.")
        if key not in valid:
            match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f" Did you mean '--{match[0]}'?" if match else ""
            raise ConfigError(f"unknown config key '{key}' in override '{item}'.{hint}")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        i += 1
    return nested


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Read a YAML file (if given), apply dotted overrides, convert and validate."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found.")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}).") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}.")
        data = loaded
    data = _merge(data, parse_overrides(overrides or [], cls))
    where = f"{path}: " if path is not None else ""
    try:
        cfg = from_dict(cls, data)
    except ConfigError as err:
        raise ConfigError(where + str(err)) from None
    validate(cfg, where)
    return cfg


def validate(cfg: Any, where: str = "") -> None:
    """Range checks that types alone cannot express."""
    problems = []
    data = getattr(cfg, "data", None)
    if isinstance(data, DataConfig):
        if data.max_length < 2:
            problems.append("data.max_length must be at least 2")
        if data.max_prompt_length is not None and data.max_prompt_length < 1:
            problems.append("data.max_prompt_length must be at least 1 (or null)")
        if not 0.0 <= data.eval_fraction < 1.0:
            problems.append("data.eval_fraction must be in [0, 1)")
    train = getattr(cfg, "train", None)
    if isinstance(train, TrainConfig):
        for name in ("batch_size", "grad_accum", "epochs", "log_every"):
            if getattr(train, name) < 1:
                problems.append(f"train.{name} must be at least 1")
        for name in ("max_steps", "eval_every", "save_every", "save_total_limit", "eval_batch_size"):
            value = getattr(train, name)
            if value is not None and value < 1:
                problems.append(f"train.{name} must be at least 1 (or null)")
        if train.lr <= 0:
            problems.append("train.lr must be positive")
        if not 0.0 <= train.warmup_ratio < 1.0:
            problems.append("train.warmup_ratio must be in [0, 1)")
        if len(train.adam_betas) != 2:
            problems.append("train.adam_betas must have two values")
        if train.max_grad_norm is not None and train.max_grad_norm <= 0:
            problems.append("train.max_grad_norm must be positive (or null for no clipping)")
    if problems:
        raise ConfigError(where + "; ".join(problems) + ".")

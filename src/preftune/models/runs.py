"""Run folders and checkpoints as models: :func:`describe_model` / :func:`load_model` find a model in
a model folder, a run folder (its ``final/``), a LoRA adapter or a training checkpoint, so
``generate``, ``eval`` and ``iterate`` take any of them. Loading itself is :mod:`preftune.models.load`'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preftune.config.schema import ModelConfig
from preftune.errors import PreftuneError
from preftune.models.load import apply_lora, freeze, load_causal_lm
from preftune.models.scorers import SequenceLogps
from preftune.models.tokenizer import check_folder, load_tokenizer


@dataclass
class ModelSource:
    """What a model path is: ``kind`` is ``model`` (save_pretrained), ``adapter`` (LoRA) or
    ``checkpoint`` (a training checkpoint's weights); ``run_config`` is its run's config.yaml."""

    path: Path
    kind: str
    run_dir: Path | None = None
    run_config: dict[str, Any] = field(default_factory=dict)
    label: str = "final"
    step: int | None = None


def describe_model(path: str | Path) -> ModelSource:
    """Tell a run folder, ``final/``, a checkpoint, an adapter and a plain model folder apart."""
    from preftune.config.yamlfile import read_yaml

    folder = Path(path).expanduser()
    if not folder.is_dir():
        folder = check_folder(str(path), "model (a model, run or checkpoint folder, or a hub id)")
    run_dir, label, step, weights = None, "final", None, folder
    if (folder / "config.yaml").is_file() and (folder / "final").is_dir():
        run_dir, weights = folder, folder / "final"
    elif folder.name == "final" and (folder.parent / "config.yaml").is_file():
        run_dir = folder.parent
    elif (folder / "state.json").is_file() and folder.parent.name == "checkpoints":
        run_dir, label = folder.parent.parent, folder.name
        step = json.loads((folder / "state.json").read_text(encoding="utf-8")).get("step")
    if weights.name == "final" and (weights / "merged").is_dir():
        weights = weights / "merged"  # a LoRA run saved merged weights too: the policy, whole
    config = read_yaml(run_dir / "config.yaml", "the run's config.yaml") if run_dir else {}
    if run_dir is not None and step is None:
        step = _last_step(run_dir)
    if label.startswith("step-"):
        kind = "checkpoint"
    elif (weights / "adapter_config.json").is_file() and not (weights / "config.json").is_file():
        kind = "adapter"
    else:
        kind = "model"
    return ModelSource(weights, kind, run_dir, config or {}, label, step)


def _last_step(run_dir: Path) -> int | None:
    path = run_dir / "metrics.jsonl"
    steps = [json.loads(line).get("step") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.is_file() else []
    return max((s for s in steps if isinstance(s, int)), default=None)


def _model_config(source: ModelSource) -> Any:
    from preftune.config.schema import from_dict

    return from_dict(ModelConfig, source.run_config["model"]) if "model" in source.run_config else ModelConfig()


def load_model(source: ModelSource, *, device: torch.device | None = None, like: ModelSource | None = None,
               trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """The causal LM (frozen, eval mode; adapters merged) and its tokenizer.

    Loading settings (dtype, attention) come from the run's model config, or from ``like``'s (a
    reference is loaded as its policy is, so the two compare at one precision). Remote code is
    never enabled by a run folder's own config.yaml (a downloaded run folder could run its
    Python): only by the caller's ``trust_remote_code``.
    """
    cfg = _model_config(source if like is None or "model" in source.run_config else like)
    cfg.trust_remote_code = trust_remote_code
    if source.kind == "model":
        model = load_causal_lm(cfg, str(source.path))
    elif source.kind == "adapter":
        from peft import PeftModel

        adapter = json.loads((source.path / "adapter_config.json").read_text(encoding="utf-8"))
        base = load_causal_lm(cfg, adapter.get("base_model_name_or_path") or cfg.path)
        model = PeftModel.from_pretrained(base, str(source.path)).merge_and_unload()
    else:
        model = _load_checkpoint(source, cfg)
    has_tokenizer = any((source.path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer(str(source.path) if has_tokenizer else (cfg.tokenizer or cfg.path), trust_remote_code=cfg.trust_remote_code)
    model = freeze(model)
    return (model.to(device) if device is not None else model), tokenizer


def _load_checkpoint(source: ModelSource, cfg: Any) -> nn.Module:
    """A training checkpoint's trainable weights on the run's base model (names as the loop saved them)."""
    from preftune.models.weights import read_weights

    if not cfg.path:
        raise PreftuneError(f"'{source.path}' is a checkpoint, but its run's config.yaml names no model.path to load it onto.")
    model = load_causal_lm(cfg)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    wrapper = SequenceLogps(model)  # the loop saved the weights of this wrapper: names start with "model."
    weights = read_weights(source.path)
    params = dict(wrapper.named_parameters())
    trainable = {name for name, p in params.items() if p.requires_grad}
    if set(weights) != trainable:
        odd = sorted(set(weights) ^ trainable)[:3]
        raise PreftuneError(f"checkpoint '{source.path}' does not match its run's model (e.g. {', '.join(odd)}): "
                            "was it written by another stage (a reward model) or with another LoRA setting?")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    return model.merge_and_unload() if cfg.lora.enabled else model

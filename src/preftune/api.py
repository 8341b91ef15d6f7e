"""The Python API: one call per training stage, over models and data already in memory.

    import preftune
    result = preftune.dpo(model, train_data=dataset, tokenizer=tokenizer, beta=0.1, max_steps=100)
    result.model        # the trained policy, in memory (the object passed in, trained in place)

Each call takes a config object (``config=DPOConfig(...)``) and/or plain keyword settings:
a section as a dict (``train={"lr": 5e-7}``) or a field by its own name when only one section
has it (``lr=5e-7``, ``beta=0.1``, ``output_dir="runs/x"``). Either way the config is built and
checked exactly as a YAML file is (same errors, same ranges), and TRL's names are answered with
preftune's. TRL's habits work too: ``processing_class=`` for ``tokenizer=``, ``peft_config=``
a peft ``LoraConfig`` (``model.lora``), ``config=`` a TRL config object (converted: see
:func:`preftune.config.trl_names.from_trl_config`). ``model`` is a loaded ``PreTrainedModel`` /
``PeftModel``, a model folder, or the model section as a dict;
``train_data`` / ``eval_data`` a ``datasets.Dataset``, a ``DatasetDict`` (its ``train`` split,
and ``validation``/``eval``/``test`` as held-out data unless ``eval_data`` is given), a list
of dicts, or a path. What the caller passes is used as is, never reloaded from disk.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.config.schema import DPOConfig, KTOConfig, RMConfig, SFTConfig, build_config, to_dict
from preftune.config.trl_names import trl_hint
from preftune.errors import ConfigError

EVAL_SPLITS = ("validation", "eval", "test")


@dataclass
class Result:
    """What a stage call returns."""

    model: Any  # the trained policy (PeftModel with LoRA) or, for reward_model, the RewardModel
    tokenizer: Any  # the tokenizer the run used (the one passed in, else the model folder's)
    run_dir: Path  # the run folder, written as by the CLI (train.output_dir)
    metrics: dict[str, float] = field(default_factory=dict)  # the last training log line and the final evaluation
    config: Any = None  # the resolved, checked config
    step: int = 0  # optimizer steps done
    stopped_by: str | None = None  # the callback that stopped the run early, if one did


def dpo(model: Any = None, train_data: Any = None, *, eval_data: Any = None, tokenizer: Any = None, ref_model: Any = None,
        config: DPOConfig | None = None, callbacks: Sequence[Any] = (), extra_terms: Sequence[Any] = (), **settings: Any) -> Result:
    """Train a policy with DPO or another preference loss (``loss.name``); see the module docstring.

    ``ref_model`` is the frozen reference (default: an exact copy of ``model`` as it starts, or
    with LoRA the same weights with the adapter off). ``extra_terms`` are callables
    ``(policy PairLogps, reference PairLogps | None) -> scalar tensor`` added to the loss.
    """
    from preftune.stages import dpo as stage

    cfg, given = _prepare(DPOConfig, config, settings, model, train_data, eval_data, tokenizer, ref_model)
    if cfg.sweep.judge or cfg.sweep.reward_model:
        raise ConfigError("sweep.judge and sweep.reward_model are read by preftune.sweep only; to judge one run, use `preftune eval`")
    return _train(lambda run: stage.build_task(cfg, run, extra_terms=extra_terms), cfg, given, callbacks)


def sft(model: Any = None, train_data: Any = None, *, eval_data: Any = None, tokenizer: Any = None,
        config: SFTConfig | None = None, callbacks: Sequence[Any] = (), **settings: Any) -> Result:
    """Supervised fine-tuning on completions (prompt tokens masked); see the module docstring."""
    from preftune.stages import sft as stage

    cfg, given = _prepare(SFTConfig, config, settings, model, train_data, eval_data, tokenizer, None)
    return _train(lambda run: stage.build_task(cfg, run), cfg, given, callbacks)


def kto(model: Any = None, train_data: Any = None, *, eval_data: Any = None, tokenizer: Any = None, ref_model: Any = None,
        config: KTOConfig | None = None, callbacks: Sequence[Any] = (), **settings: Any) -> Result:
    """Train a policy with KTO on unpaired records (``prompt``, ``completion``, ``label``)."""
    from preftune.stages import kto as stage

    cfg, given = _prepare(KTOConfig, config, settings, model, train_data, eval_data, tokenizer, ref_model)
    return _train(lambda run: stage.build_task(cfg, run), cfg, given, callbacks)


def reward_model(model: Any = None, train_data: Any = None, *, eval_data: Any = None, tokenizer: Any = None,
                 config: RMConfig | None = None, callbacks: Sequence[Any] = (), **settings: Any) -> Result:
    """Train a reward model (the backbone ``model`` + a scalar head) on preference pairs."""
    from preftune.stages import rm as stage

    cfg, given = _prepare(RMConfig, config, settings, model, train_data, eval_data, tokenizer, None)
    return _train(lambda run: stage.build_task(cfg, run), cfg, given, callbacks)


@dataclass
class IterationResult:
    """What :func:`iterate` returns: the iteration's folder and its rounds, as ``iterate.json`` holds them."""

    run_dir: Path  # the iteration's folder (train.output_dir): round-N/, iterate.json, report.html
    model_path: Path  # the last round's policy (``round-N/final``)
    rounds: list[dict[str, Any]]  # per round: pairing counts, steps, held-out judge score, win rate and KL vs the initial model
    initial: dict[str, Any]  # the initial model's held-out judge score
    config: Any = None  # the resolved, checked IterateConfig


def iterate(config: Any = None, *, judge: Any = None, callbacks: Sequence[Any] = (), **settings: Any) -> IterationResult:
    """Iterative DPO (`preftune iterate`): sample, score, pair, train, evaluate, round after round.

    ``config`` is an ``IterateConfig``, a YAML file, or None; keyword settings go on top as for
    :func:`dpo` (``rounds=3``, ``prompts=[...]``, ``train={"lr": 1e-6}``). ``judge`` scores one
    completion: a function ``(prompt, completion) -> number`` (higher is better), or a
    ``"module:function"`` name; without it, the config's ``iterate.judge`` or
    ``iterate.reward_model`` scores. ``model`` may be given as a folder (``model="path"``).
    A stopped iteration continues with ``resume_from="latest"`` and the same judge.
    """
    import json

    from preftune.config.schema import load_config
    from preftune.stages import iterate as stage
    from preftune.stages.iterate_config import IterateConfig, check

    if isinstance(config, (str, Path)):
        config = load_config(IterateConfig, config, check=lambda cfg, where: None)  # checked below, settings applied
    elif config is not None and not isinstance(config, IterateConfig):
        raise ConfigError(f"config must be an IterateConfig or a YAML file, got {type(config).__name__}")
    data = to_dict(config) if config is not None else {}
    if isinstance(settings.get("model"), (str, Path)):
        settings["model"] = {"path": str(settings["model"])}
    sections = _sections(IterateConfig, settings)
    named = [f"iterate.{key}" for key in ("judge", "reward_model") if (sections.get("iterate") or {}).get(key)]
    if judge is not None and named:
        raise ConfigError(f"name exactly one judge: judge= and {' and '.join(named)} were both given.")
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    if judge is not None:  # it replaces the judge the config file names
        data.setdefault("iterate", {}).update(judge=judge if isinstance(judge, str) else None, reward_model=None)
    if callable(judge):
        from preftune.eval.scoring import function_name

        data["iterate"]["judge"] = function_name(judge)  # what config.yaml records; the function itself scores
    cfg = build_config(IterateConfig, data, check=check)
    out = stage.run(cfg, callbacks=callbacks, judge=judge if callable(judge) else None)
    summary = json.loads((out / "iterate.json").read_text(encoding="utf-8"))
    last = summary["rounds"][-1]["policy"] if summary["rounds"] else summary["initial"]["path"]
    return IterationResult(run_dir=out, model_path=Path(last), rounds=summary["rounds"], initial=summary["initial"], config=cfg)


def sweep(values: dict[str, Sequence[Any]], config: DPOConfig | str | Path | None = None, *, judge: Any = None,
          **settings: Any) -> Path:
    """`preftune dpo --sweep` from Python: one DPO run per value (``values={"loss.beta": [0.05, 0.1, 0.3]}``,
    several keys make a grid) in ``output_dir/KEY-VALUE``, on one reference pass; returns the sweep's folder
    (``sweep.json``, ``report.html``). ``config`` is a DPOConfig or a YAML file; keyword settings go on top as
    for :func:`dpo`, with the model and data given as paths. ``judge`` judges each policy's held-out samples
    against the reference's: a function ``(prompt, policy_response, reference_response) -> [0, 1]`` or a
    ``"module:function"`` name (recorded as ``sweep.judge``); ``reward_model="FOLDER"`` judges by a reward model.
    """
    from preftune.config.schema import load_config
    from preftune.stages.sweep import run_sweep

    data = to_dict(load_config(DPOConfig, config) if isinstance(config, (str, Path)) else config) if config is not None else {}
    for key in ("model", "reward_model"):
        if isinstance(settings.get(key), (str, Path)):
            value = str(settings.pop(key))
            data.setdefault("model" if key == "model" else "sweep", {})["path" if key == "model" else "reward_model"] = value
    for section, given in _sections(DPOConfig, settings).items():
        data.setdefault(section, {}).update(given)
    if judge is not None:
        from preftune.eval.scoring import function_name

        data.setdefault("sweep", {})["judge"] = judge if isinstance(judge, str) else function_name(judge)
    cfg = build_config(DPOConfig, data)
    if not isinstance(values, dict) or not values:
        raise ConfigError("values must name what to sweep, e.g. values={'loss.beta': [0.05, 0.1, 0.3]}")
    items = [f"{key}={','.join(str(v) for v in options)}" for key, options in values.items()]
    return run_sweep(cfg, items, judge=judge if callable(judge) else None)


def _train(build: Callable[[Any], Any], cfg: Any, given: Any, callbacks: Sequence[Any]) -> Result:
    from preftune.stages.lifecycle import open_run

    with open_run(cfg, given) as run:
        task = build(run)
        fitted = run.train(task, callbacks)
    return Result(model=task.output, tokenizer=given.tokenizer, run_dir=Path(cfg.train.output_dir),
                  metrics=fitted.metrics, config=cfg, step=fitted.state.step, stopped_by=fitted.stopped_by)


def _prepare(cls: type, config: Any, settings: dict[str, Any], model: Any, train_data: Any, eval_data: Any,
             tokenizer: Any, ref_model: Any) -> tuple[Any, Any]:
    from preftune.stages.lifecycle import Given

    tokenizer = _alias(settings, "processing_class", "tokenizer", tokenizer)
    peft_config = settings.pop("peft_config", None)
    data = _config_data(cls, config)
    for section, values in _sections(cls, settings).items():
        data.setdefault(section, {}).update(values)
    if peft_config is not None:
        data.setdefault("model", {})["lora"] = {**data.get("model", {}).get("lora", {}), **lora_settings(peft_config)}
    if isinstance(model, dict):  # the model section, given by the argument of the same name
        data.setdefault("model", {}).update(model)
        model = None
    elif isinstance(model, (str, Path)):
        data.setdefault("model", {})["path"] = str(model)
        model = None
    train_data, eval_data = _splits(train_data, eval_data)
    for split, value in (("train", train_data), ("eval", eval_data)):
        if isinstance(value, (str, Path)):
            data.setdefault("data", {})[split] = [str(value)]
    cfg = build_config(cls, data)
    if tokenizer is None and (cfg.model.tokenizer or cfg.model.path):
        from preftune.models.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    in_memory = {split: value for split, value in (("train", train_data), ("eval", eval_data)) if not isinstance(value, (str, Path))}
    return cfg, Given(model=model, tokenizer=tokenizer, ref_model=ref_model,
                      train_data=in_memory.get("train"), eval_data=in_memory.get("eval"))


def _alias(settings: dict[str, Any], trl_name: str, name: str, value: Any) -> Any:
    """TRL's keyword ``trl_name`` as preftune's ``name`` (both given: an error)."""
    if trl_name not in settings:
        return value
    if value is not None:
        raise ConfigError(f"{trl_name}= is TRL's name for {name}=; give one of them.")
    return settings.pop(trl_name)


def _config_data(cls: type, config: Any) -> dict[str, Any]:
    """``config`` as a nested dict: a preftune config, or a TRL config object converted (its
    fields with no equivalent that change results refused, the others named in a warning)."""
    if config is None:
        return {}
    if isinstance(config, cls):
        return to_dict(config)
    if type(config).__module__.split(".")[0] == "trl" and dataclasses.is_dataclass(config):
        import warnings

        from preftune.config.trl_names import from_trl_config

        data, ignored = from_trl_config(config)
        if ignored:
            warnings.warn(f"the TRL {type(config).__name__}'s settings with no preftune equivalent are ignored: {', '.join(ignored)}",
                          stacklevel=4)
        return data
    raise ConfigError(f"config must be a preftune {cls.__name__} (preftune.config.schema) or a TRL config object, "
                      f"got {type(config).__module__}.{type(config).__name__}")


def lora_settings(peft_config: Any) -> dict[str, Any]:
    """A peft ``LoraConfig`` as ``model.lora``'s settings; a field preftune cannot apply, set away
    from peft's default, is refused (it would change what trains)."""
    if type(peft_config).__name__ != "LoraConfig" or not dataclasses.is_dataclass(peft_config):
        raise ConfigError(f"peft_config must be a peft LoraConfig (preftune's adapters are LoRA), got {type(peft_config).__name__}")
    targets = peft_config.target_modules
    out: dict[str, Any] = {"enabled": True, "r": peft_config.r, "alpha": peft_config.lora_alpha, "dropout": peft_config.lora_dropout}
    if targets is not None:
        out["target_modules"] = [targets] if isinstance(targets, str) else sorted(targets)
    applied = {"r", "lora_alpha", "lora_dropout", "target_modules", "task_type", "peft_type", "base_model_name_or_path", "revision",
               "inference_mode", "auto_mapping"}
    defaults = type(peft_config)()
    unsupported = [f.name for f in dataclasses.fields(peft_config)
                   if f.name not in applied and getattr(peft_config, f.name) != getattr(defaults, f.name)]
    if unsupported:
        raise ConfigError(f"peft_config sets {', '.join(unsupported)}, which preftune's LoRA does not apply (it takes r, lora_alpha, "
                          "lora_dropout, target_modules); unset them, or pass a model already wrapped with get_peft_model.")
    return out


def _splits(train_data: Any, eval_data: Any) -> tuple[Any, Any]:
    """A DatasetDict gives its ``train`` split, and a held-out split unless ``eval_data`` is given."""
    if type(train_data).__name__ != "DatasetDict":
        return train_data, eval_data
    if "train" not in train_data:
        raise ConfigError(f"the DatasetDict has no 'train' split (splits: {', '.join(train_data)}); pass train_data=dd[NAME]")
    held = next((train_data[name] for name in EVAL_SPLITS if name in train_data), None)
    return train_data["train"], eval_data if eval_data is not None else held


def _sections(cls: type, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Keyword settings -> ``{section: {field: value}}``: a section by name (a dict), or a field by
    its own name when exactly one section of ``cls`` has it."""
    hints = typing.get_type_hints(cls)
    owners: dict[str, list[str]] = {}
    for section, tp in hints.items():
        for f in dataclasses.fields(tp):
            owners.setdefault(f.name, []).append(section)
    out: dict[str, dict[str, Any]] = {}
    for key, value in settings.items():
        if key in hints:
            if not isinstance(value, dict):
                raise ConfigError(f"'{key}' is a section of {cls.__name__}: give it as a dict, e.g. {key}={{...}}")
            out.setdefault(key, {}).update(value)
        elif len(owners.get(key, [])) == 1:
            out.setdefault(owners[key][0], {})[key] = value
        elif key in owners:
            options = ", ".join(f"{section}={{'{key}': ...}}" for section in owners[key])
            raise ConfigError(f"'{key}' is a setting of several sections; say which: {options}")
        else:
            known = sorted(set(owners) | set(hints))
            match = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            explained = trl_hint(key) or (f" Did you mean '{match[0]}'?" if match else "")
            raise ConfigError(f"unknown setting '{key}' for {cls.__name__}.{explained}")
    return out

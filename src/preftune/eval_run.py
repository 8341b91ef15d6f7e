"""`preftune eval`: which models and data to evaluate, and the run that writes ``eval.json``.

:class:`EvalSettings` says what to compare; :func:`describe_model` / :func:`load_model` find a
model in a model folder, a run folder (its ``final/``), a LoRA adapter or a checkpoint; and
:func:`run_eval` computes the metrics of :mod:`preftune.evaluate` and the win rates of
:mod:`preftune.judges`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preftune.data.records import TokenizedPair
from preftune.errors import PreftuneError
from preftune.evaluate import kl_from_samples, perplexity_details, preference_metrics
from preftune.generate import Generated, GenerationSettings, decode, generate_ids
from preftune.prompts import PromptRecord, read_prompts


@dataclass
class EvalSettings:
    """`preftune eval`: what to compare, on what, and how. None means: take it from the run.

    ``policy`` is a model folder, a run folder (its ``final/`` is evaluated) or a checkpoint
    folder (``RUN/checkpoints/step-N``, loaded onto the run's base model). The reference, the
    held-out pairs (``data.eval``, or the ``data.eval_fraction`` split of ``data.train``, re-made
    exactly as training made it), ``beta`` and the length limits default to the run's.
    Samples for the KL estimate and the win rates are drawn at temperature 1 (``num_samples``
    per prompt, from the first ``max_prompts`` prompts); reference samples use ``seed + 1``.
    """

    policy: str = ""
    reference: str | None = None
    pairs: list[str] = field(default_factory=list)  # held-out preference data files
    prompts: list[str] = field(default_factory=list)  # prompt files for samples; default: the pairs' prompts
    texts: list[str] = field(default_factory=list)  # held-out text for perplexity: .txt (a text per line) or records with "text"
    judge: str | None = None  # "module:function" or "file.py:function"
    reward_model: str | None = None  # a reward model folder, as a second (or only) judge
    out: str | None = None  # folder for eval.json; default: the run folder
    label: str | None = None  # the checkpoint's name in eval-LABEL.json; default from the policy path
    format: str = "auto"  # format of `pairs`
    system: str | None = None  # system prompt for `pairs` records that bring none
    beta: float | None = None
    max_length: int | None = None
    max_prompt_length: int | None = None
    max_pairs: int | None = None
    max_prompts: int | None = 64
    num_samples: int = 2
    max_new_tokens: int = 64
    seed: int = 0
    batch_size: int = 16


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
    import yaml

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise PreftuneError(f"'{path}' is not a folder (a model, a run or a checkpoint folder).")
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
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) if run_dir else {}
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
    from preftune.config import ModelConfig, from_dict

    return from_dict(ModelConfig, source.run_config["model"]) if "model" in source.run_config else ModelConfig()


def load_model(source: ModelSource, *, device: torch.device | None = None, like: ModelSource | None = None) -> tuple[nn.Module, Any]:
    """The causal LM (frozen, eval mode; adapters merged) and its tokenizer.

    Loading settings (dtype, attention, remote code) come from the run's model config, or from
    ``like``'s (a reference is loaded as its policy is, so the two compare at one precision).
    """
    from preftune.models import freeze, load_causal_lm, load_tokenizer

    cfg = _model_config(source if like is None or "model" in source.run_config else like)
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
    from safetensors.torch import load_file

    from preftune.models import SequenceLogps, apply_lora, load_causal_lm

    if not cfg.path:
        raise PreftuneError(f"'{source.path}' is a checkpoint, but its run's config.yaml names no model.path to load it onto.")
    model = load_causal_lm(cfg)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    wrapper = SequenceLogps(model)  # the loop saved the weights of this wrapper: names start with "model."
    weights = load_file(str(source.path / "weights.safetensors"))
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


def run_eval(settings: EvalSettings) -> dict[str, Any]:
    """Evaluate ``settings.policy`` against its reference; write ``eval.json`` (or
    ``eval-LABEL.json`` for a checkpoint or an explicit label) in the output folder; return the results.

    Each part runs when its inputs exist: preference metrics with held-out pairs, perplexity
    with ``texts`` (and on the chosen completions of the pairs), KL and samples with prompts,
    win rates with a judge.
    """
    import time

    from preftune.judges import function_judge, reward_model_judge, win_rate

    started = time.perf_counter()
    if not settings.policy:
        raise PreftuneError("no policy given: name a model, run or checkpoint folder.")
    source = describe_model(settings.policy)
    reference_path = settings.reference or _run_reference(source)
    if not reference_path:
        raise PreftuneError(f"'{settings.policy}' is not a preftune run, so it has no recorded reference: give one (reference=FOLDER).")
    label = settings.label or source.label
    out_dir = Path(settings.out) if settings.out else source.run_dir
    if out_dir is None:
        raise PreftuneError("where should eval.json go? Give an output folder (out=FOLDER); only run folders have a default.")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy, tokenizer = load_model(source, device=device)
    reference, _ = load_model(describe_model(reference_path), device=device, like=source)
    data = _data_config(source, settings)
    beta = settings.beta if settings.beta is not None else _run_beta(source)
    results: dict[str, Any] = {"checkpoint": label, "step": source.step, "policy": str(source.path), "reference": str(reference_path),
                               "run_dir": str(source.run_dir) if source.run_dir else None, "settings": asdict(settings)}

    examples, pairs, results["data"] = _held_out_pairs(source, settings, data, tokenizer)
    if pairs:
        results["preference"] = preference_metrics(policy, reference, tokenizer, pairs, beta=beta, batch_size=settings.batch_size)
    if settings.texts:
        texts = [text for path in settings.texts for text in read_texts(path)]
        results["perplexity"] = {name: perplexity_details(model, tokenizer, texts, batch_size=settings.batch_size, max_length=data.max_length)
                                 for name, model in (("policy", policy), ("reference", reference))}
    prompts = _sample_prompts(settings, examples, pairs)
    judges = ([function_judge(settings.judge)] if settings.judge else []) + \
             ([reward_model_judge(settings.reward_model, batch_size=settings.batch_size, device=device)] if settings.reward_model else [])
    if prompts:
        sampling = GenerationSettings(max_new_tokens=settings.max_new_tokens, temperature=1.0, do_sample=True,
                                      num_samples=settings.num_samples, seed=settings.seed, batch_size=settings.batch_size)
        systems = [p.system for p in prompts]
        policy_samples = generate_ids(policy, tokenizer, [p.prompt for p in prompts], sampling, system=systems)
        results["kl"] = kl_from_samples(policy, reference, tokenizer, policy_samples, batch_size=settings.batch_size)
        results["kl"]["prompts"] = len(prompts)
        policy_texts = _texts(tokenizer, policy_samples)
        reference_texts: list[str] = []
        if judges:
            # Another seed: with the policy's, two close models would draw the same tokens and tie
            # far more often than independent samples do, and the win rate is defined on those.
            independent = dataclasses.replace(sampling, seed=settings.seed + 1)
            reference_samples = generate_ids(reference, tokenizer, [p.prompt for p in prompts], independent, system=systems)
            reference_texts = _texts(tokenizer, reference_samples)
            flat_prompts = [p.prompt for p in prompts for _ in range(settings.num_samples)]
            results["win_rate"] = [win_rate(flat_prompts, policy_texts, reference_texts, judge) for judge in judges]
        results["samples"] = [{"prompt": p.prompt, "policy": policy_texts[i * settings.num_samples],
                               "reference": reference_texts[i * settings.num_samples] if reference_texts else None}
                              for i, p in enumerate(prompts[:5])]
    results["seconds"] = round(time.perf_counter() - started, 2)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "eval.json" if label == "final" else f"eval-{_safe(label)}.json"
    (out_dir / name).write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
    results["path"] = str(out_dir / name)
    return results


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def _texts(tokenizer: Any, samples: Generated) -> list[str]:
    return [decode(tokenizer, ids, samples.stop_ids) for group in samples.completion_ids for ids in group]


def _run_reference(source: ModelSource) -> str | None:
    """The reference the run trained against: reference.path, else the base model.path."""
    config = source.run_config
    return (config.get("reference") or {}).get("path") or (config.get("model") or {}).get("path") or None


def _run_beta(source: ModelSource) -> float:
    from preftune.config import LossConfig, from_dict

    loss = source.run_config.get("loss")
    return from_dict(LossConfig, loss).beta if isinstance(loss, dict) and "beta" in loss else LossConfig().beta


def _data_config(source: ModelSource, settings: EvalSettings) -> Any:
    """The run's data settings (or the defaults), with the limits given in ``settings`` on top."""
    from preftune.config import DataConfig, from_dict

    data = from_dict(DataConfig, source.run_config["data"]) if "data" in source.run_config else DataConfig()
    if settings.max_length is not None:
        data.max_length = settings.max_length
    if settings.max_prompt_length is not None:
        data.max_prompt_length = settings.max_prompt_length
    return data


def _held_out_pairs(source: ModelSource, settings: EvalSettings, data: Any, tokenizer: Any) -> tuple[list, list[TokenizedPair], dict]:
    """(examples, tokenized held-out pairs with ``index`` into examples, what was used)."""
    from preftune.config import TrainConfig, from_dict
    from preftune.data import load_examples, tokenize_pairs
    from preftune.data.records import PreferenceExample

    split = False
    if settings.pairs:
        files, fmt, columns, system, origin = settings.pairs, settings.format, None, settings.system, "given"
    elif data.eval:
        files, fmt, columns, system, origin = data.eval, data.format, data.columns, data.system, "the run's data.eval"
    elif data.train and data.eval_fraction > 0:
        files, fmt, columns, system, split = data.train, data.format, data.columns, data.system, True
        origin = f"the run's eval_fraction={data.eval_fraction} split of data.train"
    else:
        return [], [], {"pairs": 0, "note": "no held-out pairs (give pairs=FILE)"}
    result = load_examples(files, format=fmt, columns=columns or None, on_error=data.on_error, system=system,
                           max_records=data.max_records)
    examples = result.examples
    if examples and not isinstance(examples[0], PreferenceExample):
        raise PreftuneError(f"{', '.join(files)}: preference metrics need paired data (prompt, chosen, rejected), not single completions.")
    pairs = tokenize_pairs(examples, tokenizer, max_length=data.max_length, max_prompt_length=data.max_prompt_length,
                           on_overflow="drop", report=result.report)
    if split:
        from preftune.dpo import split_eval  # the very split training made (same pairs, same seed)

        seed = from_dict(TrainConfig, source.run_config.get("train") or {}).seed
        _, pairs = split_eval(pairs, data.eval_fraction, seed)
    if settings.max_pairs is not None:
        pairs = pairs[: settings.max_pairs]
    info = {"files": [str(f) for f in files], "from": origin, "records": result.report.records, "pairs": len(pairs),
            "dropped": result.report.dropped, "truncation": result.report.truncation}
    return examples, pairs, info


def _sample_prompts(settings: EvalSettings, examples: list, pairs: list[TokenizedPair]) -> list[PromptRecord]:
    """Prompts for samples: the prompt files, else the held-out pairs' distinct prompts; at most max_prompts."""
    if settings.prompts:
        records = [record for path in settings.prompts for record in read_prompts(path)]
    else:
        seen: set[str] = set()
        records = []
        for pair in pairs:
            ex = examples[pair.index]
            key = json.dumps([ex.prompt, ex.system], sort_keys=True)
            if key not in seen:
                seen.add(key)
                records.append(PromptRecord(ex.prompt, ex.system, ex.source))
    return records[: settings.max_prompts] if settings.max_prompts is not None else records


def read_texts(path: str | Path) -> list[str]:
    """Held-out texts: a ``.txt`` file (one text per non-empty line), or records with a ``text`` field."""
    from preftune.data.readers import read_records
    from preftune.errors import DataError

    path = Path(path)
    if path.suffix == ".txt":
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = []
    for raw in read_records(path):
        if raw.error:
            raise raw.error
        if not isinstance(raw.data, dict) or not isinstance(raw.data.get("text"), str):
            raise raw.error_at("a text record needs a 'text' field holding text", field="text", reason="missing_field")
        texts.append(raw.data["text"])
    if not texts:
        raise DataError("no texts", file=str(path), reason="empty")
    return texts

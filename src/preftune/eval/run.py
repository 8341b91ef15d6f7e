"""`preftune eval`: which models and data to evaluate, and the run that writes ``eval.json``.

:class:`EvalSettings` says what to compare; :func:`~preftune.models.load.describe_model` and
:func:`~preftune.models.load.load_model` find a model in a model folder, a run folder (its
``final/``), a LoRA adapter or a checkpoint; and :func:`run_eval` computes the metrics of :mod:`preftune.eval.metrics` and the win rates of
:mod:`preftune.eval.judges`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from preftune.data.records import TokenizedPair
from preftune.errors import ConfigError, PreftuneError
from preftune.eval.generate import Generated, GenerationSettings, decode, generate_ids
from preftune.eval.metrics import (
    kl_from_samples,
    perplexity_details,
    preference_metrics,
)
from preftune.eval.prompts import PromptRecord, read_prompts
from preftune.models.runs import ModelSource, describe_model, load_model
from preftune.system.hardware import default_device


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
    trust_remote_code: bool = False  # run the model folder's own Python (never taken from a run's config.yaml)

    def check(self) -> None:
        """Raise ConfigError naming every setting out of range (a zero beta, a negative count)."""
        problems = []
        if self.beta is not None and not self.beta > 0:
            problems.append("beta must be positive")
        for name in ("max_length", "max_prompt_length", "max_pairs", "num_samples", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be at least 1")
        if self.max_prompts is not None and self.max_prompts < 0:
            problems.append("max_prompts must be at least 0 (0: no samples)")
        if problems:
            raise ConfigError("eval settings: " + "; ".join(problems) + ".")


def run_eval(settings: EvalSettings, judge: Any = None) -> dict[str, Any]:
    """Evaluate ``settings.policy`` against its reference; write ``eval.json`` (or
    ``eval-LABEL.json`` for a checkpoint or an explicit label) in the output folder; return the results.

    Each part runs when its inputs exist: preference metrics with held-out pairs, perplexity
    with ``texts`` (and on the chosen completions of the pairs), KL and samples with prompts,
    win rates with a judge: ``settings.judge`` (a name), or ``judge`` (a
    :class:`~preftune.eval.judges.Judge` or a function given in Python, in its place), and ``settings.reward_model``.
    Four parts: load the models, score the held-out pairs and texts, sample and judge, write.
    """
    import time

    started = time.perf_counter()
    models = _load_models(settings)
    results = {"checkpoint": models.label, "step": models.source.step, "policy": str(models.source.path),
               "reference": str(models.reference_path),
               "run_dir": str(models.source.run_dir) if models.source.run_dir else None, "settings": asdict(settings)}
    examples, pairs = _score_held_out(models, settings, results)
    _sample_and_judge(models, settings, judge, _sample_prompts(settings, examples, pairs), results)
    results["seconds"] = round(time.perf_counter() - started, 2)
    return _write(results, models.out_dir, models.label)


@dataclasses.dataclass
class _Models:
    """What an evaluation runs on: the policy and its reference, loaded, and where its results go."""

    source: Any
    reference_path: str
    label: str
    out_dir: Path
    device: Any
    policy: Any
    reference: Any
    tokenizer: Any


def _load_models(settings: EvalSettings) -> _Models:
    """The settings checked, the policy and its reference loaded (the reference a run recorded, unless given)."""
    settings.check()
    if not settings.policy:
        raise PreftuneError("no policy given: name a model, run or checkpoint folder.")
    source = describe_model(settings.policy)
    reference_path = settings.reference or _run_reference(source)
    if not reference_path:
        raise PreftuneError(f"'{settings.policy}' is not a preftune run, so it has no recorded reference: give one (reference=FOLDER).")
    out_dir = Path(settings.out) if settings.out else source.run_dir
    if out_dir is None:
        raise PreftuneError("where should eval.json go? Give an output folder (out=FOLDER); only run folders have a default.")
    device = default_device()
    remote = settings.trust_remote_code
    policy, tokenizer = load_model(source, device=device, trust_remote_code=remote)
    reference, _ = load_model(describe_model(reference_path), device=device, like=source, trust_remote_code=remote)
    return _Models(source, reference_path, settings.label or source.label, out_dir, device, policy, reference, tokenizer)


def _score_held_out(models: _Models, settings: EvalSettings, results: dict[str, Any]) -> tuple[Any, Any]:
    """Preference metrics on the held-out pairs, perplexity on ``settings.texts``, into ``results``; (examples, pairs)."""
    policy, reference, tokenizer, source = models.policy, models.reference, models.tokenizer, models.source
    data = _data_config(source, settings)
    beta = settings.beta if settings.beta is not None else _run_beta(source)
    examples, pairs, results["data"] = _held_out_pairs(source, settings, data, tokenizer)
    if pairs:
        results["preference"] = preference_metrics(policy, reference, tokenizer, pairs, beta=beta, batch_size=settings.batch_size)
    if settings.texts:
        texts = [text for path in settings.texts for text in read_texts(path)]
        results["perplexity"] = {name: perplexity_details(model, tokenizer, texts, batch_size=settings.batch_size, max_length=data.max_length)
                                 for name, model in (("policy", policy), ("reference", reference))}
    return examples, pairs


def _sample_and_judge(models: _Models, settings: EvalSettings, judge: Any, prompts: list[Any], results: dict[str, Any]) -> None:
    """On ``prompts``: the policy's samples, KL to the reference on them, win rates by every judge, a few samples, into ``results``."""
    from preftune.eval.judges import as_judge, function_judge, reward_model_judge, win_rate

    named = [as_judge(judge)] if judge is not None else [function_judge(settings.judge)] if settings.judge else []
    judges = named + ([reward_model_judge(settings.reward_model, batch_size=settings.batch_size, device=models.device)]
                      if settings.reward_model else [])  # loaded (a missing judge refused) whether or not there are prompts
    if not prompts:
        return
    policy, reference, tokenizer = models.policy, models.reference, models.tokenizer
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


def _write(results: dict[str, Any], out_dir: Path, label: str) -> dict[str, Any]:
    """``eval.json`` (``eval-LABEL.json`` for a checkpoint or a label) in ``out_dir``; ``results`` with its path."""
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
    from preftune.config.schema import LossConfig, from_dict

    loss = source.run_config.get("loss")
    return from_dict(LossConfig, loss).beta if isinstance(loss, dict) and "beta" in loss else LossConfig().beta


def _data_config(source: ModelSource, settings: EvalSettings) -> Any:
    """The run's data settings (or the defaults), with the limits given in ``settings`` on top."""
    from preftune.config.schema import DataConfig, from_dict

    data = from_dict(DataConfig, source.run_config["data"]) if "data" in source.run_config else DataConfig()
    if settings.max_length is not None:
        data.max_length = settings.max_length
    if settings.max_prompt_length is not None:
        data.max_prompt_length = settings.max_prompt_length
    return data


def _held_out_pairs(source: ModelSource, settings: EvalSettings, data: Any, tokenizer: Any) -> tuple[list, list[TokenizedPair], dict]:
    """(examples, tokenized held-out pairs with ``index`` into examples, what was used)."""
    from preftune.config.schema import TrainConfig, from_dict
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
        from preftune.data.prepare import (
            split_eval,  # the very split training made (same pairs, same seed)
        )

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

"""Batched generation with ``transformers``' own ``model.generate``, and prompts/generations as JSONL.

Prompts are encoded with :func:`preftune.data.tokenize.encode_prompt`, so a model is prompted
with exactly the ids it saw in training (chat template for message prompts, BOS once, the
``system + "\\n\\n" + prompt`` rule for text). Batches are LEFT-padded by hand from those ids,
so every row's last prompt token sits at the same position and generation continues from it.

The generation settings are only the ones given here: during the call the model's
``generation_config`` is replaced by a bare one that keeps only its BOS/EOS/pad ids, so
sampling defaults stored in a model folder (``generation_config.json``: temperature, top-p,
repetition penalty, ...) never change what a command means. Generation stops at the
tokenizer's EOS and at any EOS id of the model's own generation config.

Seeding: the global torch RNG is forked, seeded with ``seed`` once per call, and restored
afterwards, so the same prompts, settings, ``batch_size`` and seed give the same text and the
caller's RNG stream is untouched. Prompts are batched in order of length (less padding); a
prompt's samples therefore depend on which prompts share its batch, as with any batched sampler.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from preftune.errors import ConfigError, DataError, PreftuneError
from preftune.eval.prompts import Prompt, PromptRecord, read_prompts
from preftune.system.hardware import default_device
from preftune.system.progress import batches


@dataclass
class GenerationSettings:
    """How to generate. ``do_sample=None`` means: sample when ``temperature > 0`` and ``num_beams == 1``.

    ``top_k``, ``top_p``, ``min_p`` and ``repetition_penalty`` are off when None. ``num_samples``
    completions are returned per prompt (beam search: the ``num_samples`` best beams, best first).
    ``batch_size`` counts prompts per ``model.generate`` call.
    """

    max_new_tokens: int = 64  # at most this many tokens per completion (a stop token ends one sooner)
    temperature: float = 1.0  # divides the logits before sampling; 0: greedy
    top_k: int | None = None  # sample among the k most likely tokens; null: off
    top_p: float | None = None  # sample among the most likely tokens whose probabilities sum to p; null: off
    min_p: float | None = None  # drop tokens less likely than min_p times the most likely one; null: off
    num_beams: int = 1  # beam search with this many beams (1: none)
    repetition_penalty: float | None = None  # transformers' penalty on tokens already generated; null: off
    num_samples: int = 1  # completions per prompt (beam search: the best beams, best first)
    do_sample: bool | None = None  # null: sample when temperature > 0 and num_beams == 1
    seed: int = 0  # the sampling seed: the same seed, the same samples on one machine
    batch_size: int = 16  # prompts per model.generate call
    progress: bool = True  # a bar on stderr over the prompts

    @property
    def sampling(self) -> bool:
        """Whether tokens are drawn at random (else greedy or beam search)."""
        if self.do_sample is not None:
            return self.do_sample
        return self.temperature > 0 and self.num_beams == 1

    def check(self) -> None:
        """Raise :class:`ConfigError` naming every setting out of range or without effect."""
        problems = []
        if self.max_new_tokens < 1:
            problems.append("max_new_tokens must be at least 1")
        if self.temperature < 0:
            problems.append("temperature must be >= 0 (0 means greedy)")
        if self.sampling and self.temperature == 0:
            problems.append("do_sample needs temperature > 0")
        if self.top_k is not None and self.top_k < 1:
            problems.append("top_k must be at least 1 (or unset)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            problems.append("top_p must be in (0, 1]")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            problems.append("min_p must be in [0, 1]")
        if self.num_beams < 1:
            problems.append("num_beams must be at least 1")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            problems.append("repetition_penalty must be positive (1.0 is none)")
        if self.num_samples < 1 or self.batch_size < 1:
            problems.append("num_samples and batch_size must be at least 1")
        if not self.sampling:
            # Greedy/beam search ignore these filters; accepting them would hide a mistake.
            unused = [n for n in ("top_k", "top_p", "min_p") if getattr(self, n) is not None]
            if unused:
                problems.append(f"{', '.join(unused)} only apply when sampling (temperature > 0, or do_sample)")
            if self.num_beams > 1 and self.temperature not in (0.0, 1.0):
                problems.append("temperature only applies when sampling; beam search without do_sample ignores it")
            if self.num_beams == 1 and self.num_samples > 1:
                problems.append("num_samples > 1 needs sampling (temperature > 0) or beam search (num_beams >= num_samples)")
        if self.num_beams > 1 and self.num_samples > self.num_beams:
            problems.append(f"beam search returns at most num_beams={self.num_beams} sequences; num_samples is {self.num_samples}")
        if problems:
            raise ConfigError("generation settings: " + "; ".join(problems) + ".")

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain data, ``do_sample`` resolved."""
        return {**asdict(self), "do_sample": self.sampling}


@dataclass
class Generated:
    """Token ids: each prompt's ids (as encoded for the model) and, per prompt, ``num_samples``
    completions. A completion ends with the stop token when one was produced (it is then
    included), else it has ``max_new_tokens`` tokens; padding is removed."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[list[int]]]
    stop_ids: list[int] = field(default_factory=list)

    def finished(self, i: int, j: int) -> bool:
        """Whether sample ``j`` of prompt ``i`` ended with a stop token (not cut by max_new_tokens)."""
        ids = self.completion_ids[i][j]
        return bool(ids) and ids[-1] in self.stop_ids


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    system: str | Sequence[str | None] | None = None,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    num_beams: int = 1,
    repetition_penalty: float | None = None,
    num_samples: int = 1,
    do_sample: bool | None = None,
    seed: int = 0,
    batch_size: int = 16,
) -> list[list[str]]:
    """``num_samples`` completions per prompt, decoded without special tokens, each ending at EOS.

    ``system`` is one system prompt for all prompts, or one per prompt (None for none).
    See :class:`GenerationSettings` for the settings and the module docstring for padding,
    seeding and stopping.
    """
    settings = GenerationSettings(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        num_beams=num_beams, repetition_penalty=repetition_penalty, num_samples=num_samples,
        do_sample=do_sample, seed=seed, batch_size=batch_size,
    )
    out = generate_ids(model, tokenizer, prompts, settings, system=system)
    return [[decode(tokenizer, ids, out.stop_ids) for ids in samples] for samples in out.completion_ids]


def decode(tokenizer: Any, ids: list[int], stop_ids: Sequence[int] = ()) -> str:
    """A completion's text: the stop token and every special token left out, spaces kept as generated."""
    if ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def generate_ids(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    settings: GenerationSettings,
    *,
    system: str | Sequence[str | None] | None = None,
) -> Generated:
    """Generate as ``settings`` say; the token ids (for scoring, e.g. KL estimates) rather than text."""
    import torch

    from preftune.data.tokenize import encode_prompt

    settings.check()
    systems = _systems(system, len(prompts))
    prompt_ids = [encode_prompt(tokenizer, prompt, sys_prompt) for prompt, sys_prompt in zip(prompts, systems)]
    empty = [i for i, ids in enumerate(prompt_ids) if not ids]
    if empty:
        raise ConfigError(f"prompt {empty[0]} encodes to no tokens: a model needs at least one token to continue from.")
    stop_ids = _stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    config = _generation_config(settings, stop_ids, pad_id)
    device = next(model.parameters()).device
    completions: list[list[list[int]]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]))
    lm = _generation_owner(model)
    saved_config, was_training = lm.generation_config, model.training
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        lm.generation_config = _bare_generation_config(saved_config, stop_ids, pad_id)
        model.eval()
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(settings.seed)
            for start in batches(len(order), settings.batch_size, desc="generate", enabled=settings.progress):
                batch = order[start : start + settings.batch_size]
                input_ids, attention_mask = _left_pad([prompt_ids[i] for i in batch], pad_id, device)
                try:
                    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
                except ValueError as err:  # transformers' own check of a setting combination
                    raise PreftuneError(f"generation failed: {err}") from None
                new = output[:, input_ids.shape[1] :].tolist()
                for row, ids in enumerate(new):
                    completions[batch[row // settings.num_samples]].append(_until_stop(ids, stop_ids))
    finally:
        lm.generation_config = saved_config
        model.train(was_training)
    return Generated(prompt_ids, completions, stop_ids)


def _systems(system: str | Sequence[str | None] | None, n: int) -> list[str | None]:
    if system is None or isinstance(system, str):
        return [system] * n
    systems = list(system)
    if len(systems) != n:
        raise ConfigError(f"{len(systems)} system prompts for {n} prompts: give one for all, or one per prompt.")
    return systems


def _stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS (what preftune appends in training) first, then the token the chat
    template closes an assistant turn with, then the model's own EOS ids."""
    from preftune.data.tokenize import turn_end_ids

    ids = [tokenizer.eos_token_id] + [i for i in turn_end_ids(tokenizer) if i != tokenizer.eos_token_id]
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in own if isinstance(own, (list, tuple)) else [own]:
        if value is not None and value not in ids:
            ids.append(int(value))
    return ids


def _generation_owner(model: Any) -> Any:
    """The module whose ``generation_config`` ``generate`` reads (the causal LM under a peft wrapper)."""
    from preftune.models.scorers import causal_lm_of

    return causal_lm_of(model)


def _bare_generation_config(saved: Any, stop_ids: list[int], pad_id: int) -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=getattr(saved, "bos_token_id", None), eos_token_id=stop_ids, pad_token_id=pad_id)


def _generation_config(settings: GenerationSettings, stop_ids: list[int], pad_id: int) -> Any:
    from transformers import GenerationConfig

    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": settings.sampling,
        "num_beams": settings.num_beams,
        "num_return_sequences": settings.num_samples,
        "eos_token_id": stop_ids,
        "pad_token_id": pad_id,
        "use_cache": True,
    }
    if settings.sampling:
        # Every filter is written out: transformers otherwise fills unset ones with its defaults
        # (top_k=50), and samples would then not come from the model's distribution.
        kwargs.update(temperature=settings.temperature, top_k=settings.top_k or 0, top_p=settings.top_p or 1.0)
        if settings.min_p is not None:
            kwargs["min_p"] = settings.min_p
    if settings.repetition_penalty is not None:
        kwargs["repetition_penalty"] = settings.repetition_penalty
    return GenerationConfig(**kwargs)


def _left_pad(rows: list[list[int]], pad_id: int, device: Any) -> tuple[Any, Any]:
    import torch

    width = max(len(r) for r in rows)
    ids = [[pad_id] * (width - len(r)) + r for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def _until_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """Generated ids up to and including the first stop token (what follows is padding)."""
    for k, token in enumerate(ids):
        if token in stop_ids:
            return ids[: k + 1]
    return ids


# --------------------------------------------------------------------------- files
def generation_records(
    prompts: Sequence[PromptRecord], completions: Sequence[Sequence[str]], settings: GenerationSettings, *, model: str = ""
) -> list[dict[str, Any]]:
    """One record per completion: prompt, system, source, sample index, completion, settings, model."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completion lists")
    config = settings.to_dict()
    return [
        {"prompt": p.prompt, "system": p.system, "source": p.source, "sample": j, "completion": text,
         "model": model, "settings": config}
        for p, samples in zip(prompts, completions)
        for j, text in enumerate(samples)
    ]


def run_generate(
    model: str | Path,
    prompt_files: Sequence[str | Path],
    out: str | Path,
    settings: GenerationSettings,
    *,
    system: str | None = None,
    max_records: int | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """`preftune generate`: completions for every prompt of ``prompt_files``, written as JSONL to ``out``.

    ``model`` is a model folder, a run folder (its ``final/``) or a checkpoint folder, loaded on
    the GPU when there is one. ``system`` is used for prompts that bring no system prompt of their own.
    """

    from preftune.models.runs import describe_model, load_model

    settings.check()
    if Path(out).is_dir():  # found out now, not after every prompt has been sampled
        raise PreftuneError(f"--out '{out}' is a folder; give a file to write, e.g. {Path(out) / 'samples.jsonl'}")
    records = [PromptRecord(r.prompt, r.system or system, r.source)
               for path in prompt_files for r in read_prompts(path, max_records=max_records)]
    if not records:
        raise DataError("no prompts in the given files", file=", ".join(map(str, prompt_files)), reason="empty")
    device = default_device()
    source = describe_model(model)
    lm, tokenizer = load_model(source, device=device, trust_remote_code=trust_remote_code)
    output = generate_ids(lm, tokenizer, [r.prompt for r in records], settings, system=[r.system for r in records])
    texts = [[decode(tokenizer, ids, output.stop_ids) for ids in group] for group in output.completion_ids]
    return write_generations(out, generation_records(records, texts, settings, model=str(source.path)))


def write_generations(path: str | Path, records: Sequence[dict[str, Any]]) -> Path:
    """Write ``records`` as JSONL (UTF-8, one object per line), creating the folder; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path

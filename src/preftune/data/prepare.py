"""One prepare step for every stage: load -> validate -> tokenize -> split off held-out data.

``records`` says what a stage trains on:

- ``pairs`` (DPO, reward models): :class:`~preftune.data.records.TokenizedPair`;
- ``demonstrations`` (SFT): prompt/completion records as they are, the chosen side of
  preference pairs, and desirable unpaired records (undesirable ones are left out and counted
  under ``dropped['undesirable']``);
- ``unpaired`` (KTO): unpaired records with their desirable flag (preference pairs too, each as
  a desirable and an undesirable record, with ``split_pairs``); :func:`mismatched_pairs` then
  gives each its KL row.

Held-out data is ``data.eval`` when given, else a seeded ``data.eval_fraction`` split of the
training data (:func:`split_eval`, which ``preftune eval`` re-makes to find the same pairs).
Items are numbered 0..n-1 in order after the split: the key of cached reference rows.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from preftune.config import DataConfig
from preftune.data.records import DataReport, PreferenceExample, TokenizedPair, TokenizedUnpaired, UnpairedExample
from preftune.errors import DataError, PreftuneError
from preftune.progress import status

Records = Literal["pairs", "demonstrations", "unpaired"]


@dataclass
class Prepared:
    """Tokenized training and held-out items, and what the data stage found per split."""

    train: list[Any]
    eval: list[Any]
    reports: dict[str, Any] = field(default_factory=dict)  # split -> DataReport as a dict


def prepare(data: DataConfig, tokenizer: Any, *, records: Records, seed: int, sources: dict[str, Any] | None = None,
            progress: bool = False, split_pairs: bool = False) -> Prepared:
    """Load ``data.train`` (and ``data.eval``), tokenize as ``records`` says, split, number.

    ``sources`` replaces a split's files with data already in memory (``{"train": dataset}``:
    a ``datasets.Dataset``, a list of dicts, or a path), as the Python API passes it.
    """
    from preftune.data.cache import cache_key
    from preftune.data.cache import load as load_cache
    from preftune.data.cache import save as save_cache
    from preftune.data.hub import resolve_source
    from preftune.data.load import load_examples
    from preftune.data.readers import as_source
    from preftune.data.tokenize import tokenize_pairs, tokenize_unpaired

    given = {split: as_source(value, f"{split}_data") for split, value in (sources or {}).items() if value is not None}
    hub = {"subset": data.subset, "data_files": data.data_files}
    splits = {"train": given.get("train") or [resolve_source(e, split=data.train_split, **hub) for e in data.train],
              "eval": given.get("eval") or [resolve_source(e, split=data.eval_split, **hub) for e in data.eval]}
    if not splits["train"]:
        raise PreftuneError("no training data: set data.train to one or more files.")
    reports: dict[str, Any] = {}
    tokenized: dict[str, list[Any]] = {}
    for split, paths in splits.items():
        if not paths:
            tokenized[split] = []
            continue
        started = time.perf_counter()
        key = (cache_key(paths, data, tokenizer, records=records, split_pairs=split_pairs)
               if data.tokenized_cache_dir and split not in given else None)
        hit = load_cache(data.tokenized_cache_dir, key) if key else None
        if hit is not None:
            tokenized[split], reports[split] = hit
            reports[split]["tokenized_cache"] = {"key": key, "hit": True}
            status(f"read tokenized {split} records from the cache", len(hit[0]), time.perf_counter() - started, enabled=progress)
            continue
        result = load_examples(paths, format=data.format, columns=data.columns or None,
                               on_error=data.on_error, system=data.system, max_records=data.max_records,
                               prompt_marker=data.prompt_marker)
        started = time.perf_counter()
        limits = dict(max_length=data.max_length, max_prompt_length=data.max_prompt_length,
                      on_overflow=data.on_overflow, report=result.report)
        if records == "pairs":
            tokenized[split] = tokenize_pairs(result.examples, tokenizer, **limits)
        elif records == "demonstrations":
            tokenized[split] = tokenize_unpaired(as_demonstrations(result.examples, result.report), tokenizer, **limits)
        else:
            tokenized[split] = tokenize_unpaired(_unpaired(result.examples, result.report, split_pairs), tokenizer, **limits)
        reports[split] = dataclasses.asdict(result.report)
        if key:
            save_cache(data.tokenized_cache_dir, key, tokenized[split], reports[split])
            reports[split] = {**reports[split], "tokenized_cache": {"key": key, "hit": False}}
        status(f"read and tokenized {split} records", result.report.records, time.perf_counter() - started, enabled=progress)
    train, held = tokenized["train"], tokenized["eval"]
    if not held and data.eval_fraction > 0:
        train, held = split_eval(train, data.eval_fraction, seed)
    return Prepared(_reindex(train), _reindex(held), reports)


def as_demonstrations(examples: Sequence[PreferenceExample | UnpairedExample], report: DataReport) -> list[UnpairedExample]:
    """SFT examples: preference pairs give their chosen side; undesirable unpaired records are
    left out and counted (``dropped['undesirable']``)."""
    out: list[UnpairedExample] = []
    for ex in examples:
        if isinstance(ex, PreferenceExample):
            out.append(UnpairedExample(prompt=ex.prompt, completion=ex.chosen, desirable=True, system=ex.system,
                                       weight=ex.weight, source=ex.source))
        elif ex.desirable:
            out.append(ex)
        else:
            report.dropped["undesirable"] = report.dropped.get("undesirable", 0) + 1
            report.kept -= 1
    return out


def _unpaired(examples: Sequence[PreferenceExample | UnpairedExample], report: DataReport, split_pairs: bool) -> list[UnpairedExample]:
    """Unpaired records; with ``split_pairs`` a pair gives a desirable (chosen) and an undesirable
    (rejected) record, counted in ``report.findings['split_pairs']``."""
    paired = [ex for ex in examples if isinstance(ex, PreferenceExample)]
    if paired and not split_pairs:
        raise DataError(f"{len(paired)} record(s) are preference pairs (first: {paired[0].source}); KTO takes unpaired "
                        "records (prompt, completion, label): set kto.split_pairs=true to use each pair as one of each.")
    out: list[UnpairedExample] = []
    for ex in examples:
        if isinstance(ex, UnpairedExample):
            out.append(ex)
            continue
        for completion, desirable in ((ex.chosen, True), (ex.rejected, False)):
            out.append(UnpairedExample(prompt=ex.prompt, completion=completion, desirable=desirable, system=ex.system,
                                       weight=ex.weight, source=ex.source))
    if paired:
        report.findings["split_pairs"] = len(paired)  # records kept: the pairs; examples trained on: twice as many
    return out


def mismatched_pairs(items: list[TokenizedUnpaired], max_length: int, seed: int) -> list[TokenizedPair]:
    """KTO's rows: each record's prompt with its own completion ("chosen") and with the completion
    of another record ("rejected": the mismatched pair of its KL estimate), as :class:`TokenizedPair`,
    so the collators, scorers and reference cache work unchanged. ``preference`` is 1.0 for a
    desirable record and 0.0 for an undesirable one.

    The partner is fixed per record (a seeded derangement of the set), so a record's KL row is the
    same in every batch and its reference log-prob can be cached; the baseline is still the mean
    over the micro-batch's KL rows, detached, as in the paper. A partner completion that does not
    fit ``max_length`` after the prompt keeps its first tokens (at least one).
    """
    if len(items) < 2:
        raise PreftuneError("KTO's KL baseline needs at least 2 records (each is paired with another one's completion).")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    partner = {order[k]: order[(k + 1) % len(order)] for k in range(len(order))}
    rows = []
    for i, item in enumerate(items):
        other = items[partner[i]].completion_ids[: max(1, max_length - len(item.prompt_ids))]
        rows.append(TokenizedPair(prompt_ids=item.prompt_ids, chosen_ids=item.completion_ids, rejected_ids=other,
                                  index=item.index, preference=1.0 if item.desirable else 0.0, weight=item.weight,
                                  source=item.source))
    return rows


def split_eval(items: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, held out): a seeded ``fraction`` of ``items`` (at least one), order kept in both."""
    if fraction <= 0:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * len(items)))
    held = set(order[:n_eval])
    return [p for i, p in enumerate(items) if i not in held], [p for i, p in enumerate(items) if i in held]


def _reindex(items: list[Any]) -> list[Any]:
    """Number the items 0..n-1 in order: the key of cached reference rows."""
    return [dataclasses.replace(item, index=i) for i, item in enumerate(items)]

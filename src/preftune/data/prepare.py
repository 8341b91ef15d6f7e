"""One prepare step for every stage: load -> validate -> tokenize -> split off held-out data.

``records`` says what a stage trains on:

- ``pairs`` (DPO, reward models): :class:`~preftune.data.records.TokenizedPair`;
- ``demonstrations`` (SFT): prompt/completion records as they are, the chosen side of
  preference pairs, and desirable unpaired records (undesirable ones are left out and counted
  under ``dropped['undesirable']``);
- ``unpaired`` (KTO): unpaired records with their desirable flag (preference pairs too, each as
  a desirable and an undesirable record, with ``split_pairs``); :func:`mismatched_pairs` then
  gives each its KL row.

Records stream through reading, checking, tokenizing and storing, :data:`CHUNK` examples at a
time, so memory never holds the dataset's texts, only its token ids, 4 bytes a token
(:mod:`preftune.data.store`), and not even those when they go to the tokenized cache, which is
then memory-mapped. The items come back as a :class:`~preftune.data.store.TokenizedItems`.

Held-out data is ``data.eval`` when given, else a seeded ``data.eval_fraction`` split of the
training data (:func:`split_eval`, which ``preftune eval`` re-makes to find the same pairs).
Items are numbered 0..n-1 in order after the split: the key of cached reference rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from preftune.config.schema import DataConfig
from preftune.data.records import DataReport, PreferenceExample, TokenizedPair, TokenizedUnpaired, UnpairedExample
from preftune.data.store import TokenizedItems
from preftune.errors import DataError, PreftuneError
from preftune.system.progress import counter, status

Records = Literal["pairs", "demonstrations", "unpaired"]
#: examples tokenized at a time (a chunk's texts and token lists are what memory holds of them)
CHUNK = 1024


@dataclass
class Prepared:
    """Tokenized training and held-out items, and what the data stage found per split."""

    train: Sequence[Any]  # TokenizedItems, or a list
    eval: Sequence[Any]
    reports: dict[str, Any] = field(default_factory=dict)  # split -> DataReport as a dict


def prepare(data: DataConfig, tokenizer: Any, *, records: Records, seed: int, sources: dict[str, Any] | None = None,
            progress: bool = False, split_pairs: bool = False) -> Prepared:
    """Load ``data.train`` (and ``data.eval``), tokenize as ``records`` says, split, number.

    ``sources`` replaces a split's files with data already in memory (``{"train": dataset}``:
    a ``datasets.Dataset``, a list of dicts, or a path), as the Python API passes it.
    """
    from preftune.data.cache import cache_key
    from preftune.data.cache import load as load_cache
    from preftune.data.hub import resolve_source
    from preftune.data.readers import as_source

    given = {split: as_source(value, f"{split}_data") for split, value in (sources or {}).items() if value is not None}
    hub = {"subset": data.subset, "data_files": data.data_files}
    splits = {"train": given.get("train") or [resolve_source(e, split=data.train_split, **hub) for e in data.train],
              "eval": given.get("eval") or [resolve_source(e, split=data.eval_split, **hub) for e in data.eval]}
    if not splits["train"]:
        raise PreftuneError("no training data: set data.train to one or more files.")
    reports: dict[str, Any] = {}
    tokenized: dict[str, Sequence[Any]] = {}
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
        tokenized[split], reports[split] = _tokenize_split(paths, data, tokenizer, records, split_pairs, key,
                                                           progress=progress, desc=f"tokenize {split}")
        if key:
            reports[split] = {**reports[split], "tokenized_cache": {"key": key, "hit": False}}
        status(f"read and tokenized {split} records", reports[split]["records"], time.perf_counter() - started, enabled=progress)
    train, held = tokenized["train"], tokenized["eval"]
    if not held and data.eval_fraction > 0:
        train, held = split_eval(train, data.eval_fraction, seed)
    return Prepared(_reindex(train), _reindex(held), reports)


def _tokenize_split(paths: list[Any], data: DataConfig, tokenizer: Any, records: Records, split_pairs: bool,
                    key: str | None, *, progress: bool = False, desc: str = "tokenize") -> tuple[TokenizedItems, dict[str, Any]]:
    """Stream one split's records into stored items: (items, the data report as a dict). With a
    cache ``key`` the ids go straight into the tokenized cache file, which is then memory-mapped."""
    from preftune.data.cache import CacheWriter
    from preftune.data.load import ExampleStream, chunked
    from preftune.data.store import ItemsWriter
    from preftune.data.tokenize import TokenizeStream

    stream = ExampleStream(paths, format=data.format, columns=data.columns or None, on_error=data.on_error,
                           system=data.system, max_records=data.max_records, prompt_marker=data.prompt_marker)
    kind = "pairs" if records == "pairs" else "unpaired"
    tokens = TokenizeStream(tokenizer, kind, max_length=data.max_length, max_prompt_length=data.max_prompt_length,
                            on_overflow=data.on_overflow)
    tally = _Tally()
    if records == "pairs":
        examples: Iterator[Any] = _pairs(stream)
    elif records == "demonstrations":
        examples = _demonstrations(stream, tally)
    else:
        examples = _unpaired(stream, tally, split_pairs)
    sink: Any = CacheWriter(data.tokenized_cache_dir, key, kind) if key else contextlib.nullcontext(ItemsWriter(kind))
    with sink as writer, counter(desc, unit="record", enabled=progress) as bar:
        for chunk in chunked(examples, CHUNK):
            for item in tokens.add(chunk):
                writer.add(item)
            bar.update(len(chunk))
        tally.apply(stream.report)  # after the loader's counts, as when every example was loaded first
        tokens.fill(stream.report)
        report = dataclasses.asdict(stream.report)
        items = writer.commit(report) if key else writer.items()
    return items, report


@dataclass
class _Tally:
    """What turning records into a stage's examples counted; written into the report at the end."""

    undesirable: int = 0
    pairs: int = 0
    split_pairs: bool = False

    def apply(self, report: DataReport) -> None:
        if self.undesirable:
            report.dropped["undesirable"] = report.dropped.get("undesirable", 0) + self.undesirable
            report.kept -= self.undesirable
        if self.pairs and self.split_pairs:
            report.findings["split_pairs"] = self.pairs  # records kept: the pairs; examples trained on: twice as many


def _pairs(examples: Iterable[PreferenceExample | UnpairedExample]) -> Iterator[PreferenceExample]:
    for ex in examples:
        if not isinstance(ex, PreferenceExample):
            raise DataError(f"record {ex.source} is an unpaired record (prompt, completion, label); this stage trains "
                            "on preference pairs (prompt, chosen, rejected).", reason="unpaired")
        yield ex


def _demonstrations(examples: Iterable[PreferenceExample | UnpairedExample], tally: _Tally) -> Iterator[UnpairedExample]:
    """SFT examples, one at a time: a pair gives its chosen side; undesirable records are counted."""
    for ex in examples:
        if isinstance(ex, PreferenceExample):
            yield UnpairedExample(prompt=ex.prompt, completion=ex.chosen, desirable=True, system=ex.system,
                                  weight=ex.weight, source=ex.source)
        elif ex.desirable:
            yield ex
        else:
            tally.undesirable += 1


def as_demonstrations(examples: Sequence[PreferenceExample | UnpairedExample], report: DataReport) -> list[UnpairedExample]:
    """SFT examples: preference pairs give their chosen side; undesirable unpaired records are
    left out and counted (``dropped['undesirable']``)."""
    tally = _Tally()
    out = list(_demonstrations(examples, tally))
    tally.apply(report)
    return out


def _unpaired(examples: Iterable[PreferenceExample | UnpairedExample], tally: _Tally, split_pairs: bool) -> Iterator[UnpairedExample]:
    """Unpaired records, one at a time; with ``split_pairs`` a pair gives a desirable (chosen) and an
    undesirable (rejected) record, counted in ``report.findings['split_pairs']``. Pairs without it
    are refused once every record is read (so the message counts them, and a malformed record
    still stops the load first)."""
    tally.split_pairs = split_pairs
    first_pair = None
    for ex in examples:
        if isinstance(ex, UnpairedExample):
            yield ex
            continue
        tally.pairs += 1
        first_pair = first_pair or ex.source
        if split_pairs:
            for completion, desirable in ((ex.chosen, True), (ex.rejected, False)):
                yield UnpairedExample(prompt=ex.prompt, completion=completion, desirable=desirable, system=ex.system,
                                      weight=ex.weight, source=ex.source)
    if tally.pairs and not split_pairs:
        raise DataError(f"{tally.pairs} record(s) are preference pairs (first: {first_pair}); KTO takes unpaired "
                        "records (prompt, completion, label): set kto.split_pairs=true to use each pair as one of each.")


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


def split_eval(items: Sequence[Any], fraction: float, seed: int) -> tuple[Sequence[Any], Sequence[Any]]:
    """(train, held out): a seeded ``fraction`` of ``items`` (at least one), order kept in both.
    Stored items (:class:`~preftune.data.store.TokenizedItems`) give two views of them, lists two lists."""
    if fraction <= 0:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * len(items)))
    held = set(order[:n_eval])
    if isinstance(items, TokenizedItems):
        return (items.select([i for i in range(len(items)) if i not in held]),
                items.select([i for i in range(len(items)) if i in held]))
    return [p for i, p in enumerate(items) if i not in held], [p for i, p in enumerate(items) if i in held]


def _reindex(items: Sequence[Any]) -> Sequence[Any]:
    """Number the items 0..n-1 in order: the key of cached reference rows (stored items already are)."""
    if isinstance(items, TokenizedItems):
        return items
    return [dataclasses.replace(item, index=i) for i, item in enumerate(items)]

"""What ``preftune data inspect`` shows: a dataset's report, as text or plain data.

The same loading code as training runs there, with the same defaults, so what inspect reports
is what a run will keep and drop; with a tokenizer the examples are also tokenized and
truncated as training would do it (:func:`tokenize_for_report`). The verb's arguments live in
:mod:`preftune.cli.verbs`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from preftune.data.records import DataReport, UnpairedExample
from preftune.data.validate import EXTRA_FINDINGS, FINDINGS
from preftune.errors import ConfigError


def parse_columns(text: str) -> dict[str, str]:
    """``"prompt=question,chosen=better"`` -> ``{"prompt": "question", "chosen": "better"}``."""
    columns: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        ours, sep, theirs = item.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise ConfigError(f"--columns takes OURS=THEIRS pairs separated by commas, got {item!r}")
        columns[ours.strip()] = theirs.strip()
    return columns


def report_dict(report: DataReport, *, with_tokens: bool) -> dict[str, Any]:
    """The report as plain data; ``tokens`` and ``truncation`` only when a tokenizer ran."""
    summary = dataclasses.asdict(report)
    if not with_tokens:
        del summary["tokens"], summary["truncation"]
    return summary


def format_report(summary: dict[str, Any]) -> str:
    """A readable, aligned text version of :func:`report_dict`'s output."""
    lines = [
        f"files     {', '.join(summary['files'])}",
        f"format    {summary['format'] or '-'}",
        f"records   {summary['records']}",
        f"kept      {summary['kept']}",
        f"dropped   {sum(summary['dropped'].values())}",
    ]
    examples = summary["examples"]
    for reason, count in sorted(summary["dropped"].items()):
        lines.append(f"  {reason:<26}{count:>7}{_where(examples.get(reason))}")
    lines.append("findings (kept and reported, unless dropped above)")
    known = list(FINDINGS + EXTRA_FINDINGS)
    names = known + sorted(set(summary["findings"]) - set(known))
    for name in names:
        count = summary["findings"].get(name, 0)
        if name in summary["dropped"]:
            where = "   (dropped)"
        else:
            where = _where(examples.get(name)) if count else ""
        lines.append(f"  {name:<26}{count:>7}{where}")
    if summary.get("labels"):  # unpaired (KTO) records: how many of each kind
        labels = summary["labels"]
        lines.append("labels (unpaired records kept)")
        for label in ("desirable", "undesirable"):
            lines.append(f"  {label:<26}{labels.get(label, 0):>7}")
        warning = label_balance_warning(labels.get("desirable", 0), labels.get("undesirable", 0))
        if warning:
            lines.append(f"  ! {warning}")
    for section in ("tokens", "truncation"):
        if section in summary:
            lines.append(section)
            for key, value in summary[section].items():
                lines.append(f"  {key:<26}{_value(value)}")
    return "\n".join(lines) + "\n"


def label_balance_warning(desirable: int, undesirable: int, desirable_weight: float = 1.0,
                          undesirable_weight: float = 1.0) -> str | None:
    """What KTO's authors (and TRL) say about the labels' balance, or None when it is as they
    recommend: both kinds present, and ``desirable_weight x n_D / (undesirable_weight x n_U)`` in
    [1, 4/3] (Ethayarajh et al. 2024, section 4.3)."""
    if desirable + undesirable == 0:
        return None
    if not desirable or not undesirable:
        only = "desirable" if desirable else "undesirable"
        return (f"every record is {only} ({desirable + undesirable}): KTO then only moves {only} completions against the "
                "KL baseline, with nothing on the other side; add records of the other label.")
    ratio = desirable_weight * desirable / (undesirable_weight * undesirable)
    if 1.0 <= ratio <= 4 / 3:
        return None
    low, high = desirable / undesirable / (4 / 3) * desirable_weight, desirable / undesirable * desirable_weight
    return (f"desirable_weight x n_desirable / (undesirable_weight x n_undesirable) = {desirable_weight:g} x {desirable} / "
            f"({undesirable_weight:g} x {undesirable}) = {ratio:.2f}, outside the [1, 4/3] KTO's authors recommend: "
            f"set loss.undesirable_weight between {low:.3g} and {high:.3g} (with loss.desirable_weight={desirable_weight:g}).")


def _where(locations: list[str] | None) -> str:
    return f"   e.g. {', '.join(locations)}" if locations else ""


def _value(value: Any) -> str:
    if isinstance(value, dict):
        return "  ".join(f"{k}={_value(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def tokenize_for_report(examples: list, report: DataReport, tokenizer: Any, *, max_length: int,
                        max_prompt_length: int | None) -> None:
    """Tokenize and truncate as training does, filling ``report.tokens`` / ``.truncation``.

    ``on_overflow="drop"``: inspect reports what would be cut or dropped rather than stopping.
    """
    from preftune.data.tokenize import tokenize_pairs, tokenize_unpaired

    unpaired = any(isinstance(e, UnpairedExample) for e in examples)
    tokenize_fn = tokenize_unpaired if unpaired else tokenize_pairs
    tokenize_fn(examples, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                on_overflow="drop", report=report)


def inspect_files(paths: list[str], *, format: str = "auto", columns: dict[str, str] | None = None, on_error: str = "skip",
                  max_records: int | None = None, tokenizer: Any = None, max_length: int = 1024,
                  max_prompt_length: int | None = None) -> DataReport:
    """The report of ``preftune data inspect``: load (and with a ``tokenizer``, tokenize) as
    :func:`~preftune.data.load.load_examples` and :func:`tokenize_for_report` do, one chunk of
    records at a time, so a large file is never held whole. The report is the same."""
    from preftune.data.load import ExampleStream, chunked
    from preftune.data.prepare import CHUNK
    from preftune.data.tokenize import TokenizeStream

    stream = ExampleStream(paths, format=format, columns=columns, on_error=on_error, max_records=max_records)
    tokens = None
    for chunk in chunked(stream, CHUNK):
        if tokenizer is None:
            continue
        if tokens is None:  # one load holds one kind (paired and unpaired are never mixed)
            kind = "unpaired" if isinstance(chunk[0], UnpairedExample) else "pairs"
            tokens = TokenizeStream(tokenizer, kind, max_length=max_length, max_prompt_length=max_prompt_length)
        tokens.add(chunk)
    if tokenizer is not None:
        tokens = tokens or TokenizeStream(tokenizer, "pairs", max_length=max_length, max_prompt_length=max_prompt_length)
        tokens.fill(stream.report)
    return stream.report


#: Records every run leaves out by design (counted, never an error): no preference, or cannot fit.
BY_DESIGN = ("identical_pairs", "ties", "too_long", "undesirable")


def malformed_count(report: DataReport) -> int:
    """Records left out because they are malformed: those training with ``on_error: error`` refuses."""
    return sum(count for reason, count in report.dropped.items() if reason not in BY_DESIGN)

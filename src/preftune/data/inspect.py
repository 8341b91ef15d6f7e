"""``preftune data inspect PATH``: read a dataset, check every record, report what it holds.

The same loading code as training runs here, with the same defaults, so what inspect reports
is what a run will keep and drop. With ``--tokenizer`` the examples are also tokenized and
truncated as training would do it, and token-length statistics are shown. ``--json`` prints
exactly one JSON object on stdout (the DataReport), for scripts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from preftune.config import DataConfig
from preftune.data.formats import FORMATS
from preftune.data.load import load_examples
from preftune.data.records import DataReport, UnpairedExample
from preftune.data.validate import EXTRA_FINDINGS, FINDINGS
from preftune.errors import ConfigError, PreftuneError

_DEFAULTS = DataConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``data inspect`` arguments to ``parser``."""
    parser.add_argument(
        "path", nargs="+", help="data files (.jsonl, .json, .csv, .tsv, each also .gz; .parquet) or `datasets` folders"
    )
    parser.add_argument("--format", default="auto", choices=("auto",) + FORMATS, help="input format (default: detected)")
    parser.add_argument(
        "--columns", default="", metavar="OURS=THEIRS,...", help="rename fields, e.g. prompt=question,chosen=better"
    )
    parser.add_argument(
        "--on-error",
        default=_DEFAULTS.on_error,
        choices=("error", "skip"),
        help="a malformed record stops the command (error, the default, as in training) or is skipped and counted",
    )
    parser.add_argument("--max-records", type=int, default=None, metavar="N", help="read at most N records per file")
    parser.add_argument(
        "--tokenizer", default=None, metavar="DIR", help="a tokenizer folder: also report token lengths and truncation"
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=_DEFAULTS.max_length,
        metavar="N",
        help=f"prompt + completion tokens (default {_DEFAULTS.max_length})",
    )
    parser.add_argument(
        "--max-prompt-length",
        type=int,
        default=_DEFAULTS.max_prompt_length,
        metavar="N",
        help=f"prompt tokens; a longer prompt keeps its end (default {_DEFAULTS.max_prompt_length})",
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


def run(args: argparse.Namespace) -> int:
    """Load (and optionally tokenize) the data, print the report; return the exit status."""
    result = load_examples(
        args.path,
        format=args.format,
        columns=parse_columns(args.columns),
        on_error=args.on_error,
        max_records=args.max_records,
    )
    report = result.report
    if args.tokenizer:
        _tokenize(result.examples, report, args)
    summary = report_dict(report, with_tokens=bool(args.tokenizer))
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        print(format_report(summary), end="")
    return 0


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
    for section in ("tokens", "truncation"):
        if section in summary:
            lines.append(section)
            for key, value in summary[section].items():
                lines.append(f"  {key:<26}{_value(value)}")
    return "\n".join(lines) + "\n"


def _where(locations: list[str] | None) -> str:
    return f"   e.g. {', '.join(locations)}" if locations else ""


def _value(value: Any) -> str:
    if isinstance(value, dict):
        return "  ".join(f"{k}={_value(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _tokenize(examples: list, report: DataReport, args: argparse.Namespace) -> None:
    """Tokenize and truncate as training does, filling ``report.tokens`` / ``.truncation``."""
    tokenizer = load_tokenizer(args.tokenizer)
    from preftune.data import tokenize

    if any(isinstance(e, UnpairedExample) for e in examples):
        if not hasattr(tokenize, "tokenize_unpaired"):
            raise PreftuneError(
                "token statistics for unpaired (KTO) data are not available: "
                "preftune.data.tokenize has no tokenize_unpaired"
            )
        tokenize_fn = tokenize.tokenize_unpaired
    else:
        tokenize_fn = tokenize.tokenize_pairs
    # on_overflow="drop": inspect reports what would be cut or dropped rather than stopping.
    tokenize_fn(
        examples,
        tokenizer,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        on_overflow="drop",
        report=report,
    )


def load_tokenizer(path: str) -> Any:
    """A tokenizer from a local folder, or a PreftuneError that says why there is none.

    Kept here rather than borrowed from ``preftune.models`` so that ``data inspect`` never
    imports torch.
    """
    from pathlib import Path

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise PreftuneError(f"--tokenizer '{path}' is not a folder (tokenizers load from local folders only)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # OSError, ValueError, tokenizers' own errors: all mean "not a tokenizer"
        raise PreftuneError(
            f"--tokenizer '{path}' is not a tokenizer folder (expected tokenizer.json or "
            f"tokenizer_config.json as written by save_pretrained): {err}"
        ) from None

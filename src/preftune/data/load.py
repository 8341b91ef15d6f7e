"""``load_examples``: files in, normalised examples and a DataReport out.

read (readers.py) -> rename columns -> detect format -> convert (formats.py) -> check and
count (validate.py), one record at a time (:class:`ExampleStream`; ``load_examples`` keeps them
all). A malformed record stops the load with a DataError naming file, line or
record, and field; with ``on_error="skip"`` it is left out and counted in
``report.dropped[reason]`` instead. Ties and identical pairs are always left out and counted
(see validate.py for what is kept and why).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.data.formats import (
    FORMATS,
    Converted,
    convert,
    detect_format,
    rename_columns,
)
from preftune.data.readers import InMemory, read_records
from preftune.data.records import DataReport, PreferenceExample, UnpairedExample
from preftune.data.validate import ReportBuilder
from preftune.errors import ConfigError, DataError

ON_ERROR = ("error", "skip")
_SKIP_HINT = " (with on_error: skip, or --on-error skip, such records are left out and counted)"


@dataclass
class LoadResult:
    """The examples kept, in file order, and the report of what was read, found and dropped."""

    examples: list[PreferenceExample | UnpairedExample]
    report: DataReport


def load_examples(
    paths: str | Path | InMemory | list[str | Path | InMemory],
    *,
    format: str = "auto",
    columns: dict[str, str] | None = None,
    on_error: str = "error",
    system: str | None = None,
    max_records: int | None = None,
    prompt_marker: str = "\n\nAssistant:",
) -> LoadResult:
    """Read preference data from one or more files (or in-memory sources) and normalise it.

    ``format`` is ``"auto"`` (detected per file from its first good record) or one of
    :data:`~preftune.data.formats.FORMATS`. ``columns`` maps our field names to the file's
    (``{"prompt": "question"}``). ``system`` is a default system prompt for records that bring
    none. ``max_records`` caps the records read from EACH file. Paired and unpaired files
    cannot be mixed in one load. ``prompt_marker``: where pairs of whole texts split (see
    :func:`~preftune.data.formats.convert`).

    ``report.records`` counts records read, ``report.kept == len(examples)``, and
    ``report.dropped`` maps each reason to the records left out for it.
    """
    stream = ExampleStream(paths, format=format, columns=columns, on_error=on_error, system=system,
                           max_records=max_records, prompt_marker=prompt_marker)
    examples = list(stream)
    return LoadResult(examples, stream.report)


class ExampleStream:
    """:func:`load_examples` one example at a time, for data too large to hold: iterate once, in
    file order; :attr:`report` is complete when the iteration ends. The arguments are checked
    (and refused) at once, as :func:`load_examples` does."""

    def __init__(
        self,
        paths: str | Path | InMemory | list[str | Path | InMemory],
        *,
        format: str = "auto",
        columns: dict[str, str] | None = None,
        on_error: str = "error",
        system: str | None = None,
        max_records: int | None = None,
        prompt_marker: str = "\n\nAssistant:",
    ) -> None:
        self.paths = _check_arguments(paths, format, columns, on_error, system, max_records)
        self.format, self.columns, self.on_error = format, dict(columns or {}), on_error
        self.system, self.max_records, self.prompt_marker = system, max_records, prompt_marker
        self.builder = ReportBuilder([str(p) for p in self.paths])
        self._started = False

    @property
    def report(self) -> DataReport:
        """What was read, found and dropped (so far; all of it once the iteration has ended)."""
        return self.builder.report

    def __iter__(self) -> Iterator[PreferenceExample | UnpairedExample]:
        if self._started:
            raise RuntimeError("an ExampleStream is read once")
        self._started = True
        builder, columns = self.builder, self.columns
        file_formats: list[str] = []
        for path in self.paths:
            fmt = None if self.format == "auto" else self.format
            for raw in read_records(path, max_records=self.max_records):
                builder.record_read()
                missing = [(ours, theirs) for ours, theirs in columns.items() if theirs not in raw.data] if not raw.error else []
                if missing:  # never fall back on the file's own field of our name
                    ours, theirs = missing[0]
                    raw.error = raw.error_at(f"has no field '{theirs}' (columns maps '{ours}' to it)", field=theirs,
                                             reason="missing_field")
                data = None if raw.error else rename_columns(raw.data, columns)
                if fmt is None and data is not None:
                    fmt = detect_format(raw, data)  # not skippable: the whole file depends on it
                    _check_mix(file_formats + [fmt], str(path))
                try:
                    if raw.error:
                        raise raw.error
                    converted: Converted = convert(raw, data, fmt, system=self.system, columns=columns,
                                                   prompt_marker=self.prompt_marker)
                except DataError as err:
                    if self.on_error == "error":
                        raise _with_hint(err) from None
                    builder.drop(err.reason, raw.location)
                    continue
                for finding in converted.notes:
                    builder.note(finding, raw.location)
                if converted.drop:
                    builder.drop(converted.drop, raw.location)
                elif builder.check(converted.example, raw.location):
                    yield converted.example
            if fmt is not None:
                file_formats.append(fmt)
        builder.report.format = "+".join(dict.fromkeys(file_formats))


def chunked(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """``items`` in lists of ``size`` (the last one shorter), read as they are needed."""
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _check_arguments(
    paths: str | Path | InMemory | list[str | Path | InMemory],
    format: str,
    columns: dict[str, str] | None,
    on_error: str,
    system: str | None,
    max_records: int | None,
) -> list[str | Path | InMemory]:
    path_list = [paths] if isinstance(paths, (str, Path, InMemory)) else list(paths)
    if not path_list:
        raise ConfigError("no data files given")
    for path in path_list:
        if not isinstance(path, (str, Path, InMemory)):
            raise ConfigError(f"a data path must be a string (or in-memory records, from Python), got {path!r}")
    if format not in ("auto",) + FORMATS:
        near = difflib.get_close_matches(str(format), ("auto",) + FORMATS, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"unknown data format '{format}'{hint} (formats: auto, {', '.join(FORMATS)})")
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error must be 'error' or 'skip', got {on_error!r}")
    for ours, theirs in (columns or {}).items():
        if not isinstance(ours, str) or not isinstance(theirs, str):
            raise ConfigError(f"columns maps field names to field names; got {ours!r}: {theirs!r}")
    if system is not None and not isinstance(system, str):
        raise ConfigError(f"system must be a string, got {system!r}")
    positive_int = isinstance(max_records, int) and not isinstance(max_records, bool) and max_records >= 1
    if max_records is not None and not positive_int:
        raise ConfigError(f"max_records must be a positive integer (or null), got {max_records!r}")
    return path_list


def _check_mix(formats: list[str], file: str) -> None:
    """Paired and unpaired examples need different losses, so one load holds one kind."""
    from preftune.data.formats import SINGLE_FORMATS

    kinds = {f in SINGLE_FORMATS for f in formats}
    if len(kinds) > 1:
        raise DataError(
            f"paired and unpaired data cannot be mixed in one load (formats: {', '.join(dict.fromkeys(formats))})",
            file=file,
            reason="mixed_formats",
        )


def _with_hint(err: DataError) -> DataError:
    return DataError(
        err.problem + _SKIP_HINT,
        file=err.file,
        line=err.line,
        record=err.record,
        field=err.field,
        reason=err.reason,
    )

"""Streaming readers: a data file (or a `datasets` folder) in, raw records with their location out.

Supported inputs, chosen by extension (a ``.gz`` suffix, or gzip content under any name, is
decompressed on the fly):

- ``.jsonl`` / ``.ndjson``: one JSON object per line; the location is the 1-based line.
- ``.json``: a JSON array of objects (streamed: memory holds the current record and one read
  chunk, not the file), or, when the first character is ``{``, JSON Lines.
- ``.csv`` / ``.tsv``: a header row, then one record per row (all values are text; see
  :func:`parse_json_cell` for chat columns).
- ``.parquet``: read in batches with pyarrow.
- a folder written by ``datasets.Dataset.save_to_disk``.

Every record but JSONL's is located by its 0-based index. A problem confined to one record (a
line that is not JSON, not UTF-8, or not an object) is yielded as a :class:`RawRecord` whose
``error`` is set, so the caller decides whether to stop or skip and count it. A problem with
the whole file (missing, empty, unsupported, or a broken JSON array after which nothing can be
trusted) raises :class:`~preftune.errors.DataError` at once.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from preftune.data.jsonarray import JsonArrayReader, strict_loads
from preftune.data.paths import check_readable
from preftune.errors import DataError

#: extension (after an optional ``.gz``) -> reader kind
EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}
_GZIP_MAGIC = b"\x1f\x8b"
#: bytes read per step when looking for a .json file's first character
_PEEK_BYTES = 1 << 16


@dataclass
class RawRecord:
    """One record as read, before any format is applied.

    ``data`` is the decoded value (a dict for a good record; ``None`` when ``error`` is set).
    ``line`` is the 1-based line for JSONL and ``None`` otherwise; ``index`` is the 0-based
    position among the file's records. ``from_text`` marks CSV values, which are all strings
    and may need converting (numbers, booleans, JSON chat messages).
    """

    data: Any
    file: str
    line: int | None
    index: int
    from_text: bool = False
    error: DataError | None = None

    @property
    def location(self) -> str:
        """``file:line`` for JSONL, ``file:index`` for the other formats."""
        return f"{self.file}:{self.line if self.line is not None else self.index}"

    def error_at(self, problem: str, *, field: str | None = None, reason: str) -> DataError:
        """A :class:`DataError` located at this record."""
        return DataError(
            problem,
            file=self.file,
            line=self.line,
            record=self.index if self.line is None else None,
            field=field,
            reason=reason,
        )


@dataclass
class InMemory:
    """Records already in memory: a ``datasets.Dataset``, or any sequence of dicts.

    ``name`` stands where a file name would in reports and errors ("record 3 of train_data").
    """

    rows: Any
    name: str

    def __str__(self) -> str:
        return self.name


def as_source(data: Any, name: str) -> str | Path | InMemory:
    """A path stays a path; a ``datasets.Dataset`` or a list/tuple of dicts becomes :class:`InMemory`.

    A ``DatasetDict`` is refused here (the caller picks a split by name).
    """
    if isinstance(data, (str, Path, InMemory)):
        return data
    if type(data).__name__ in ("DatasetDict", "IterableDatasetDict"):
        raise DataError(f"{name} is a DatasetDict (splits: {', '.join(data)}): pass one split, e.g. {name}['train']",
                        reason="unsupported_extension")
    if hasattr(data, "column_names") or isinstance(data, (list, tuple)):
        return InMemory(data, name)
    raise DataError(f"{name} must be a file path, a datasets.Dataset or a list of dicts, got {type(data).__name__}",
                    reason="unsupported_extension")


def _read_in_memory(source: InMemory) -> Iterator[RawRecord]:
    for index, row in enumerate(source.rows):
        if isinstance(row, dict):
            yield RawRecord(row, source.name, None, index)
        else:
            error = DataError(f"expected a mapping of fields, got {_json_type(row)}", file=source.name, record=index,
                              reason="not_an_object")
            yield RawRecord(None, source.name, None, index, error=error)


def read_records(path: str | Path | InMemory, *, max_records: int | None = None) -> Iterator[RawRecord]:
    """Yield the raw records of one file, `datasets` folder or in-memory source, at most ``max_records``.

    Raises :class:`DataError` for a missing path, an unsupported extension, an empty file,
    and damage that makes the rest of the file unreadable.
    """
    name = str(path)
    if isinstance(path, InMemory):
        records = _read_in_memory(path)
    else:
        records = _read_path(Path(path), name)
    count = 0
    try:
        for record in records:
            if max_records is not None and count >= max_records:
                break
            count += 1
            yield record
    except (OSError, EOFError, zlib.error) as err:  # unreadable, or damaged gzip data
        raise DataError(f"the file cannot be read: {err}", file=name, reason="unreadable") from None
    if count == 0:
        raise DataError("the file holds no records" if not isinstance(path, InMemory) else "it holds no records",
                        file=name, reason="empty_file")


def _read_path(path: Path, name: str) -> Iterator[RawRecord]:
    if check_readable(path, name) == "folder":
        records = _read_dataset_folder(path, name)
    else:
        kind = _kind(path, name)
        readers = {
            "jsonl": _read_jsonl,
            "json": _read_json,
            "csv": _read_csv,
            "tsv": _read_csv,
            "parquet": _read_parquet,
        }
        records = readers[kind](path, name)
    yield from records


def parse_json_cell(value: Any) -> Any:
    """A CSV cell holding a JSON list of objects or a JSON object, decoded; anything else as is.

    Chat data exported to CSV keeps each message list as JSON text. Only lists of objects and
    objects are decoded, so ordinary text that happens to be valid JSON (``"[1, 2]"``, ``"3"``)
    stays text.
    """
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not (text.startswith("[") and text.endswith("]")) and not (
        text.startswith("{") and text.endswith("}")
    ):
        return value
    try:
        decoded = json.loads(text)
    except json.JSONDecodeError:
        return value
    if isinstance(decoded, dict) or (
        isinstance(decoded, list) and decoded and all(isinstance(m, dict) for m in decoded)
    ):
        return decoded
    return value


# --------------------------------------------------------------------------- file kinds
def _kind(path: Path, name: str) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    gzipped = bool(suffixes) and suffixes[-1] == ".gz"
    if gzipped:
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    if ext not in EXTENSIONS or (gzipped and ext == ".parquet"):
        supported = ".jsonl, .ndjson, .json, .csv, .tsv (each also .gz), .parquet, or a `datasets` folder"
        shown = (ext + (".gz" if gzipped else "")) or path.name
        raise DataError(
            f"unsupported file type '{shown}'; supported: {supported}",
            file=name,
            reason="unsupported_extension",
        )
    return EXTENSIONS[ext]


@contextmanager
def _open_bytes(path: Path, name: str) -> Iterator[IO[bytes]]:
    """The file's bytes, gunzipped when its content is gzip (whatever its name says); a file named
    ``.gz`` whose content is not gzip is refused (a wrong name, or a file cut before its header)."""
    with path.open("rb") as raw:
        head = raw.read(2)
        is_gzip = head == _GZIP_MAGIC
        raw.seek(0)
        if not is_gzip and path.suffix.lower() == ".gz":
            raise DataError(f"named .gz, but its content is not gzip data (it starts with {head!r}); rename it without .gz if it is "
                            "plain text, or compress it again", file=name, reason="unreadable")
        if not is_gzip:
            yield raw
            return
        with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
            yield unzipped


# --------------------------------------------------------------------------- JSON Lines
def _read_jsonl(path: Path, name: str, hint: str = "") -> Iterator[RawRecord]:
    index = 0
    with _open_bytes(path, name) as stream:
        for line_no, raw in enumerate(stream, start=1):
            if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            if not raw.strip():
                continue  # blank lines separate nothing and are not records
            yield _decode_line(raw, name, line_no, index, hint if line_no == 1 else "")
            index += 1


def _decode_line(raw: bytes, name: str, line_no: int, index: int, hint: str) -> RawRecord:
    record = RawRecord(None, name, line_no, index)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        record.error = record.error_at(
            f"not valid UTF-8 (bad byte 0x{raw[err.start]:02x} at byte {err.start + 1} of the line)",
            reason="invalid_utf8",
        )
        return record
    try:
        value = strict_loads(text)
    except json.JSONDecodeError as err:
        record.error = record.error_at(
            f"invalid JSON: {err.msg} (column {err.colno}){hint}", reason="invalid_json"
        )
        return record
    except ValueError as err:  # a duplicated key, a lone surrogate, nesting too deep
        record.error = record.error_at(f"invalid JSON: {err}", reason="invalid_json")
        return record
    if not isinstance(value, dict):
        record.error = record.error_at(
            f"a record must be a JSON object, got {_json_type(value)}", reason="not_an_object"
        )
        return record
    record.data = value
    return record


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int in Python
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------- JSON arrays
def _read_json(path: Path, name: str) -> Iterator[RawRecord]:
    first = _first_char(path, name)
    if first == "":
        return  # read_records reports the empty file
    if first == "{":
        hint = " (a .json file must hold one JSON array of records, or one JSON object per line)"
        yield from _read_jsonl(path, name, hint)
        return
    if first != "[":
        raise DataError(
            "a .json file must hold a JSON array of records (or one JSON object per line); "
            f"it starts with {first!r}",
            file=name,
            reason="not_an_object",
        )
    with _open_bytes(path, name) as stream:
        text = io.TextIOWrapper(stream, encoding="utf-8-sig")
        try:
            for index, value in enumerate(JsonArrayReader(text, name).values()):
                record = RawRecord(value, name, None, index)
                if not isinstance(value, dict):
                    record.data = None
                    record.error = record.error_at(
                        f"a record must be a JSON object, got {_json_type(value)}", reason="not_an_object"
                    )
                yield record
        except UnicodeDecodeError as err:
            raise DataError(f"not valid UTF-8: {err.reason}", file=name, reason="invalid_utf8") from None


def _first_char(path: Path, name: str) -> str:
    """The first non-whitespace character of the (decompressed) file, or '' when there is none."""
    with _open_bytes(path, name) as stream:
        while chunk := stream.read(_PEEK_BYTES):
            stripped = chunk.removeprefix(codecs.BOM_UTF8).lstrip()
            if stripped:
                return chr(stripped[0]) if stripped[0] < 128 else "\ufffd"
    return ""


# --------------------------------------------------------------------------- CSV
def _read_csv(path: Path, name: str) -> Iterator[RawRecord]:
    # A chat column can hold megabytes; the csv module's default cap is 128 KiB per field.
    csv.field_size_limit(2**31 - 1)
    delimiter = "\t" if _kind(path, name) == "tsv" else ","
    index = 0
    with _open_bytes(path, name) as stream:
        text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
        try:
            reader = csv.DictReader(text, delimiter=delimiter, restkey="\0extra")
            for row in reader:
                record = RawRecord(row, name, None, index, from_text=True)
                if "\0extra" in row or any(v is None for v in row.values()):
                    record.data = None
                    record.error = record.error_at(
                        f"the row (file line {reader.line_num}) has a different number of "
                        f"values than the header ({len(reader.fieldnames or [])})",
                        reason="malformed_row",
                    )
                yield record
                index += 1
        except UnicodeDecodeError as err:
            raise DataError(f"not valid UTF-8: {err.reason}", file=name, record=index, reason="invalid_utf8") from None
        except csv.Error as err:
            raise DataError(f"invalid CSV: {err}", file=name, record=index, reason="invalid_csv") from None


# --------------------------------------------------------------------------- Parquet, datasets
def _read_parquet(path: Path, name: str) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(str(path))
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a bad file
        raise DataError(f"not a readable Parquet file: {err}", file=name, reason="unreadable") from None
    index = 0
    batches = parquet.iter_batches(batch_size=256)
    while True:
        try:
            batch = next(batches, None)
        except Exception as err:  # a damaged row group: pyarrow's own error types
            raise DataError(f"cannot read the Parquet data: {err}", file=name, record=index, reason="unreadable") from None
        if batch is None:
            return
        for row in batch.to_pylist():
            yield RawRecord(row, name, None, index)
            index += 1


#: The files that mark a folder written by `datasets`' save_to_disk.
SAVE_TO_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def _read_dataset_folder(path: Path, name: str) -> Iterator[RawRecord]:
    if not any((path / m).exists() for m in SAVE_TO_DISK_MARKERS):
        raise DataError(
            "a folder must be a dataset saved with `datasets` save_to_disk, or one in the hub's layout "
            "(a README.md card and data files; training reads it with data.train_split / data.eval_split)",
            file=name,
            reason="unsupported_extension",
        )
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError, ValueError, ... here
        raise DataError(f"cannot load the `datasets` folder: {err}", file=name, reason="unreadable") from None
    if isinstance(dataset, datasets.DatasetDict):
        splits = list(dataset)
        if len(splits) != 1:
            raise DataError(
                f"the folder holds the splits {', '.join(splits)}; pass one split's folder, "
                f"e.g. {path / splits[0]}",
                file=name,
                reason="unsupported_extension",
            )
        dataset = dataset[splits[0]]
    for index, row in enumerate(dataset):
        yield RawRecord(row, name, None, index)

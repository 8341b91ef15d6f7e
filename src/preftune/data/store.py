"""Tokenized items held compactly: one flat int32 buffer of token ids, with offsets.

A list of Python ints costs about 36 bytes a token (an 8-byte pointer and a 28-byte int); here a
token costs 4. The buffer is in memory (``array('i')``) or memory-mapped from the tokenized
cache file, so a warm load reads only the pages that are used, and the operating system can
drop them again (they are the file's, not the process's heap).

:class:`TokenizedItems` is a read-only sequence of :class:`~preftune.data.records.TokenizedPair`
(or ``TokenizedUnpaired``): indexing builds one item, its ids as lists of ints as every collator
takes them; ``item.index`` is its position in the sequence (items are numbered 0..n-1: the key
of cached reference rows). :meth:`TokenizedItems.select` is a view of some positions (the
held-out split) that copies no ids.

On disk (:func:`write_items`, :func:`open_items`) the items are one safetensors file: ``ids``
(I32, every item's id fields one after another), ``offsets`` (I64, n x fields + 1 boundaries),
``item_max`` (I32, each item's highest id, -1 for none), the numeric fields (F64, U8 for
booleans), and ``sources`` (U8: a JSON list of the items' sources, UTF-8). The
ids are streamed into the file while the items are made (the header's room is reserved first),
so a cold preparation never holds them all.
"""

from __future__ import annotations

import bisect
import json
import mmap
import os
import sys
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from preftune.data.records import TokenizedPair, TokenizedUnpaired

#: bytes reserved for the safetensors header (8-byte size + JSON); the data starts page-aligned
HEADER_ROOM = 4096
#: token ids written to a file per block
_BLOCK = 1 << 20
_DTYPES = {"i": "I32", "q": "I64", "d": "F64", "B": "U8"}


@dataclass(frozen=True)
class Layout:
    """What one kind of item holds: its class, its id fields, its numeric fields (array typecodes)."""

    cls: type
    id_fields: tuple[str, ...]
    numbers: dict[str, str]


LAYOUTS = {
    "pairs": Layout(TokenizedPair, ("prompt_ids", "chosen_ids", "rejected_ids"),
                    {"preference": "d", "weight": "d", "margin": "d"}),
    "unpaired": Layout(TokenizedUnpaired, ("prompt_ids", "completion_ids"), {"desirable": "B", "weight": "d"}),
}


@dataclass
class Columns:
    """The data of n items: ids (flat), id-field boundaries, per-item maximum id, numbers, sources."""

    kind: str
    ids: Sequence[int]  # array('i') or a memoryview cast to 'i' (memory-mapped)
    offsets: array  # 'q', n * len(id_fields) + 1
    item_max: array  # 'i', n
    numbers: dict[str, array]
    sources: list[str]

    def __len__(self) -> int:
        return len(self.item_max)


class TokenizedItems(Sequence):
    """A read-only sequence of tokenized items over :class:`Columns` (see the module docstring)."""

    def __init__(self, columns: Columns, rows: Sequence[int] | None = None) -> None:
        self.columns = columns
        self.layout = LAYOUTS[columns.kind]
        self._rows = rows  # positions in `columns`; None: all of them, in order

    @property
    def kind(self) -> str:
        return self.columns.kind

    def __len__(self) -> int:
        return len(self.columns) if self._rows is None else len(self._rows)

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):  # a list of the items, as a list's slice (numbered as here)
            return [self[i] for i in range(len(self))[key]]
        position = key + len(self) if key < 0 else key
        if not 0 <= position < len(self):
            raise IndexError(f"item {key} of {len(self)}")
        return self._item(position if self._rows is None else self._rows[position], position)

    def __iter__(self) -> Iterator[Any]:
        for position in range(len(self)):
            yield self._item(position if self._rows is None else self._rows[position], position)

    def _item(self, row: int, position: int) -> Any:
        c, k = self.columns, len(self.layout.id_fields)
        bounds = c.offsets[row * k : row * k + k + 1]
        fields: dict[str, Any] = {name: c.ids[bounds[j] : bounds[j + 1]].tolist() for j, name in enumerate(self.layout.id_fields)}
        for name, code in self.layout.numbers.items():
            fields[name] = bool(c.numbers[name][row]) if code == "B" else c.numbers[name][row]
        return self.layout.cls(**fields, index=position, source=c.sources[row])

    def select(self, positions: Sequence[int]) -> TokenizedItems:
        """A view of the items at ``positions`` (renumbered 0..len-1), sharing the ids."""
        rows = array("q", positions if self._rows is None else (self._rows[p] for p in positions))
        return TokenizedItems(self.columns, rows)

    def max_token_id(self) -> int:
        """The highest token id of these items (-1 when they hold none)."""
        item_max = self.columns.item_max
        return max((item_max[r] for r in (self._rows if self._rows is not None else range(len(item_max)))), default=-1)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __add__(self, other: Sequence[Any]) -> Chain:
        return Chain([self, other])

    def __radd__(self, other: Sequence[Any]) -> Chain:
        return Chain([other, self])

    def __repr__(self) -> str:
        return f"TokenizedItems({self.kind}, {len(self)} items)"


class Chain(Sequence):
    """Sequences one after another, without copying (``train + eval`` for a vocabulary check)."""

    def __init__(self, parts: Sequence[Sequence[Any]]) -> None:
        self.parts = [p for part in parts for p in (part.parts if isinstance(part, Chain) else [part])]
        self._starts = [0]
        for part in self.parts:
            self._starts.append(self._starts[-1] + len(part))

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            return [self[i] for i in range(len(self))[key]]
        position = key + len(self) if key < 0 else key
        if not 0 <= position < len(self):
            raise IndexError(f"item {key} of {len(self)}")
        part = bisect.bisect_right(self._starts, position) - 1
        return self.parts[part][position - self._starts[part]]

    def __iter__(self) -> Iterator[Any]:
        for part in self.parts:
            yield from part

    def __add__(self, other: Sequence[Any]) -> Chain:
        return Chain([self, other])

    def max_token_id(self) -> int:
        """The highest token id of every part (-1 when they hold none)."""
        return max((max_token_id(part) for part in self.parts), default=-1)


def max_token_id(rows: Sequence[Any]) -> int:
    """The highest token id of tokenized items, or of rows of them (SFT's packed rows); -1 for none.
    A compact sequence answers from its per-item maxima, without building the items."""
    if hasattr(rows, "max_token_id"):
        return rows.max_token_id()
    names = ("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids")
    return max((max(ids) for row in rows for x in (row if isinstance(row, list) else [row])
                for ids in (getattr(x, n, None) for n in names) if ids), default=-1)


class ItemsWriter:
    """Items appended one at a time; their ids go into an int32 buffer in memory, or into ``file``
    (opened by :func:`write_items`'s caller), block by block."""

    def __init__(self, kind: str, file: IO[bytes] | None = None) -> None:
        self.layout = LAYOUTS[kind]
        self.columns = Columns(kind, array("i"), array("q", [0]), array("i"),
                               {name: array(code) for name, code in self.layout.numbers.items()}, [])
        self._file = file
        self._tokens = 0

    def add(self, item: Any) -> None:
        """Append one tokenized item (a TokenizedPair or TokenizedUnpaired of this writer's kind)."""
        c = self.columns
        highest = -1
        for name in self.layout.id_fields:
            ids = getattr(item, name)
            c.ids.fromlist(ids)
            self._tokens += len(ids)
            c.offsets.append(self._tokens)
            if ids:
                highest = max(highest, max(ids))
        c.item_max.append(highest)
        for name in self.layout.numbers:
            c.numbers[name].append(getattr(item, name))
        c.sources.append(item.source)
        if self._file is not None and len(c.ids) >= _BLOCK:
            self._flush()

    def _flush(self) -> None:
        ids = self.columns.ids
        if sys.byteorder != "little":
            ids.byteswap()
        ids.tofile(self._file)
        del ids[:]

    def items(self) -> TokenizedItems:
        """The items written so far, in memory (a writer without a file)."""
        if self._file is not None:
            raise ValueError("this writer streams to a file: open_items() reads it")
        return TokenizedItems(self.columns)

    def finish_file(self) -> None:
        """Write what is left and the header: the file is then a complete safetensors file."""
        self._flush()
        c, f = self.columns, self._file
        blocks: list[tuple[str, Any]] = [("offsets", c.offsets), ("item_max", c.item_max), *c.numbers.items(),
                                         ("sources", json.dumps(c.sources, ensure_ascii=False).encode("utf-8"))]
        header: dict[str, Any] = {"__metadata__": {"kind": c.kind, "items": str(len(c))},
                                  "ids": {"dtype": "I32", "shape": [self._tokens], "data_offsets": [0, 4 * self._tokens]}}
        end = 4 * self._tokens
        for name, values in blocks:
            size = len(values) * (values.itemsize if isinstance(values, array) else 1)
            code = values.typecode if isinstance(values, array) else "B"
            header[name] = {"dtype": _DTYPES[code], "shape": [len(values)], "data_offsets": [end, end + size]}
            end += size
            if isinstance(values, array) and sys.byteorder != "little":
                values = array(code, values)
                values.byteswap()
            f.write(values.tobytes() if isinstance(values, array) else values)
        text = json.dumps(header).encode("utf-8")
        if len(text) > HEADER_ROOM - 8:
            raise ValueError(f"the header needs {len(text)} bytes, more than the {HEADER_ROOM - 8} reserved")
        f.seek(0)
        f.write((HEADER_ROOM - 8).to_bytes(8, "little") + text + b" " * (HEADER_ROOM - 8 - len(text)))
        f.flush()


def start_file(f: IO[bytes]) -> None:
    """Reserve the header's room at the start of an empty file opened for ``ItemsWriter``."""
    f.write(b" " * HEADER_ROOM)


def open_items(path: Path) -> TokenizedItems:
    """The items of a file written by :class:`ItemsWriter`, their ids memory-mapped. Raises
    ``ValueError`` (or ``OSError``) when the file is not one, or is damaged."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size < os.fstat(f.fileno()).st_size:
            raise ValueError("not a safetensors file")
        header = json.loads(f.read(size))
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    meta, start = header.pop("__metadata__"), 8 + size
    layout = LAYOUTS[meta["kind"]]
    n, k = int(meta["items"]), len(layout.id_fields)
    codes = {"ids": "i", "offsets": "q", "item_max": "i", **layout.numbers, "sources": "B"}
    if set(header) != set(codes) or len(mapped) != start + max(t["data_offsets"][1] for t in header.values()):
        raise ValueError("unexpected tensors or size")
    for name, code in codes.items():
        begin, end = header[name]["data_offsets"]
        if header[name]["dtype"] != _DTYPES[code] or [(end - begin) // array(code).itemsize] != header[name]["shape"]:
            raise ValueError(f"tensor {name}: unexpected dtype or shape")

    def read(name: str) -> array:
        begin, end = header[name]["data_offsets"]
        values = array(codes[name], mapped[start + begin : start + end])
        if sys.byteorder != "little":
            values.byteswap()
        return values

    begin, end = header["ids"]["data_offsets"]
    ids: Sequence[int] = memoryview(mapped)[start + begin : start + end].cast("i") if sys.byteorder == "little" else read("ids")
    sources = json.loads(read("sources").tobytes().decode("utf-8"))
    columns = Columns(meta["kind"], ids, read("offsets"), read("item_max"), {name: read(name) for name in layout.numbers}, sources)
    if (len(columns.item_max) != n or len(columns.offsets) != n * k + 1 or len(sources) != n
            or any(len(v) != n for v in columns.numbers.values()) or columns.offsets[-1] != len(ids)):
        raise ValueError("inconsistent lengths")
    return TokenizedItems(columns)

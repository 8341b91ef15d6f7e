"""Stream the elements of a top-level JSON array without holding the whole file.

``json.load`` needs the whole text in memory, and then the whole decoded list too. Here
``JSONDecoder.raw_decode`` decodes one element at a time from a buffer that keeps only the
text not yet decoded, so memory follows the largest record, not the file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import IO, Any, NoReturn

from preftune.errors import DataError

#: characters read per step; doubled while a single record is larger than the buffer
CHUNK_CHARS = 1 << 16
_WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's four whitespace characters
_DELIMITER = re.compile(r"[ \t\n\r,\]}]")  # what can end a number


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for json: an object that names a key twice is an error, not its last value."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} appears twice in one object")
        out[key] = value
    return out


def check_decoded(text: str, value: Any) -> None:
    """Raise ValueError for text the JSON standard allows but no tokenizer takes: a lone surrogate
    (``\\ud800`` escaped without its pair)."""
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("invalid Unicode escape: a lone surrogate (\\ud800-\\udfff without its pair)") from None


def strict_loads(text: str) -> Any:
    """``json.loads`` that refuses duplicated keys, lone surrogates and nesting too deep for the parser."""
    try:
        value = json.loads(text, object_pairs_hook=no_duplicate_keys)
    except RecursionError:
        raise ValueError("nested too deeply to read") from None
    check_decoded(text, value)
    return value

class JsonArrayReader:
    """Decode ``[value, value, ...]`` from a text stream, one element at a time.

    When an element does not fit in the buffer, the next read is as large as the buffer, so a
    single huge record is re-scanned O(log size) times, not once per chunk. Damage raises
    :class:`DataError` naming the file, the index of the element, and the file line.
    """

    def __init__(self, stream: IO[str], name: str) -> None:
        self.stream = stream
        self.name = name
        self.decoder = json.JSONDecoder(object_pairs_hook=no_duplicate_keys)
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.line = 1  # the file line of buf[0], for error messages

    def values(self) -> Iterator[Any]:
        """The array's elements in order; then checks nothing but whitespace follows it."""
        if self._peek() != "[":
            self._fail(0, "a JSON array must start with '['")
        self.pos += 1
        index = 0
        if self._peek() == "]":
            self.pos += 1
        else:
            while True:
                yield self._value(index)
                index += 1
                separator = self._peek()
                if separator == "]":
                    self.pos += 1
                    break
                if separator != ",":
                    found = repr(separator) if separator else "the end of the file"
                    self._fail(index - 1, f"expected ',' or ']' after the record, found {found}")
                self.pos += 1
        if self._peek() != "":
            self._fail(index, "unexpected text after the closing ']'")

    def _more(self) -> bool:
        """Drop decoded text, then read more; False at the end of the file."""
        self.line += self.buf.count("\n", 0, self.pos)
        self.buf = self.buf[self.pos :]
        self.pos = 0
        chunk = self.stream.read(max(CHUNK_CHARS, len(self.buf)))
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def _peek(self) -> str:
        """The next non-whitespace character ('' at the end), without consuming it."""
        while True:
            self.pos = _WHITESPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                return ""

    def _value(self, index: int) -> Any:
        self._peek()  # raw_decode does not skip leading whitespace
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
                check_decoded(self.buf[self.pos : end], value)
            except json.JSONDecodeError as err:
                if self.eof:
                    line = self.line + self.buf.count("\n", 0, err.pos)
                    self._fail(index, f"invalid JSON: {err.msg} (line {line})")
            except RecursionError:
                self._fail(index, "invalid JSON: nested too deeply to read")
            except ValueError as err:  # a duplicated key, a lone surrogate
                self._fail(index, f"invalid JSON: {err}")
            else:
                # Only a number can decode "successfully" while cut short ("-6.5e3" read as
                # "-6" when the buffer ends in "-6."): accept it once a delimiter follows it.
                is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
                if self.eof or not is_number or _DELIMITER.search(self.buf, end):
                    self.pos = end
                    return value
            self._more()

    def _fail(self, index: int, problem: str) -> NoReturn:
        raise DataError(problem, file=self.name, record=index, reason="invalid_json")

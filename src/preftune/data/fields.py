"""Typed access to one record's fields, with errors that name the file's own field names.

Used by every input format (:mod:`preftune.data.formats`); a field mapped with ``columns`` is
named in errors as the file calls it, with ours in brackets.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

from preftune.data.hh import HH_ASSISTANT
from preftune.data.readers import RawRecord, parse_json_cell
from preftune.data.records import ROLES
from preftune.errors import DataError


class Fields:
    """Typed access to a record's fields, with errors that name the file's own field names."""

    def __init__(self, raw: RawRecord, data: dict[str, Any], columns: dict[str, str], prompt_marker: str = HH_ASSISTANT) -> None:
        self.raw = raw
        self.data = data
        self.columns = columns
        self.prompt_marker = prompt_marker

    def error(self, field: str, problem: str, reason: str) -> DataError:
        if field.split("[")[0] in self.columns:
            ours = field.split("[")[0]
            field = self.columns[ours] + field[len(ours) :]
            problem = f"{problem} (read as '{ours}')"
        return self.raw.error_at(problem, field=field, reason=reason)

    def get(self, field: str, *, required: bool = True) -> Any:
        if field not in self.data:
            if not required:
                return None
            keys = ", ".join(sorted(map(str, self.data))) or "none"
            raise self.error(field, f"is missing (the record has: {keys})", "missing_field")
        value = self.data[field]
        if value is None and required:
            raise self.error(field, "is null", "missing_field")
        return value

    def chat(self, field: str, *, required: bool = True) -> Any:
        """A field that may hold messages; in CSV they arrive as JSON text and are decoded.

        Only fields read this way are decoded, so an explicit-format CSV prompt that happens
        to look like JSON stays text.
        """
        value = self.get(field, required=required)
        return parse_json_cell(value) if self.raw.from_text else value

    def text(self, field: str, *, required: bool = True) -> str | None:
        value = self.get(field, required=required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(field, f"must be text, got {describe(value)}", "non_string")
        return value

    def system(self, default: str | None) -> str | None:
        value = self.text("system", required=False)
        if value is None or (self.raw.from_text and value == ""):
            return default  # an empty CSV cell is how CSV says "absent"
        return value

    def messages(self, field: str, value: Any = None) -> list[dict[str, str]]:
        value = self.chat(field) if value is None else value
        if not isinstance(value, list):
            raise self.error(field, f"must be a list of messages, got {describe(value)}", "wrong_type")
        if not value:
            raise self.error(field, "is an empty list of messages", "empty_messages")
        return [self._message(f"{field}[{i}]", m) for i, m in enumerate(value)]

    def _message(self, where: str, message: Any) -> dict[str, str]:
        if not isinstance(message, dict):
            raise self.error(where, f"must be a {{role, content}} object, got {describe(message)}", "wrong_type")
        for key in ("role", "content"):
            if key not in message:
                raise self.error(where, f"has no '{key}'", "missing_field")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise self.error(where, f"has the unknown role {role!r}; roles are {', '.join(ROLES)}", "unknown_role")
        if not isinstance(content, str):
            raise self.error(f"{where}.content", f"must be text, got {describe(content)}", "non_string")
        # Only role and content reach the chat template; other keys (name, ids) are not kept.
        return {"role": role, "content": content}


def describe(value: Any) -> str:
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return f"{type(value).__name__} {shown}"


def record_weight(f: Fields) -> float:
    """The optional ``weight`` field: the record's weight in the loss's weighted mean, finite and >= 0."""
    value = number(f, "weight", 1.0)
    if not (math.isfinite(value) and value >= 0):
        raise f.error("weight", f"must be a finite number >= 0 (the record's weight in the loss), got {value}", "wrong_type")
    return value


def number(f: Fields, field: str, default: float) -> float:
    """An optional numeric field (CSV and TSV cells hold it as text); NaN, an infinity or an integer too
    large for a float (a 400-digit one) is refused: the loss would not be finite."""
    value = f.get(field, required=False)
    if value is None or (f.raw.from_text and value == ""):
        return default
    if f.raw.from_text and isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise f.error(field, f"must be a number, got {describe(value)}", "wrong_type")
    if (isinstance(value, int) and abs(value) >= 2**1023) or not math.isfinite(float(value)):
        raise f.error(field, f"must be a finite number, got {describe(value)}", "wrong_type")
    return float(value)

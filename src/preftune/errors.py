"""User-facing errors.

Every problem the user can fix (a bad file, a bad record, a config typo, a tokenizer without a
chat template) is raised as a :class:`PreftuneError`. The CLI prints its message, one short
paragraph, and exits with status 2; the traceback is shown only with ``--debug``.
"""

from __future__ import annotations


class PreftuneError(Exception):
    """An error whose message is meant for the user, not a developer."""

    exit_code: int = 2


class ConfigError(PreftuneError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


class DataError(PreftuneError):
    """A data file or record is malformed.

    The message names the file, the line (JSONL, 1-based) or record index (other formats,
    0-based), the field, and the problem, so the user can go straight to it.
    """

    def __init__(
        self,
        problem: str,
        *,
        file: str | None = None,
        line: int | None = None,
        record: int | None = None,
        field: str | None = None,
        reason: str = "malformed",
    ) -> None:
        self.problem = problem
        self.file = file
        self.line = line
        self.record = record
        self.field = field
        #: short machine-readable reason, used as the key when a skipped record is counted
        self.reason = reason
        super().__init__(self._format())

    def location(self) -> str:
        parts = []
        if self.file is not None:
            parts.append(str(self.file))
        if self.line is not None:
            parts.append(f"line {self.line}")
        elif self.record is not None:
            parts.append(f"record {self.record}")
        if self.field is not None:
            parts.append(f"field '{self.field}'")
        return ", ".join(parts)

    def _format(self) -> str:
        where = self.location()
        return f"{where}: {self.problem}" if where else self.problem


class TokenizationError(PreftuneError):
    """Tokenization broke an invariant (prompt ids not a prefix, BOS twice, no chat template)."""


class TrainingError(PreftuneError):
    """Training cannot go on (NaN loss, bad checkpoint, incompatible resume)."""

"""The core records every input format normalises to (see DESIGN.md, "The core types")."""

from __future__ import annotations

from dataclasses import dataclass, field

#: A chat message: {"role": "system" | "user" | "assistant", "content": str}
Message = dict
#: A prompt or completion: plain text, or a list of chat messages.
Text = str | list

ROLES = ("system", "user", "assistant")


@dataclass
class PreferenceExample:
    """One preference pair.

    ``prompt`` is a string or a list of chat messages; ``chosen`` and ``rejected`` are the
    completions only (a string, or a list of assistant messages). ``preference`` is the
    probability that chosen beats rejected (1.0 for a hard label; soft labels from votes).
    ``source`` says where the record came from, e.g. ``"data.jsonl:17"``.
    """

    prompt: Text
    chosen: Text
    rejected: Text
    system: str | None = None
    weight: float = 1.0
    preference: float = 1.0
    source: str = ""
    margin: float = 0.0  # reward models: how much better chosen is (optional data field)


@dataclass
class UnpairedExample:
    """One unpaired completion for KTO: ``desirable`` is the thumbs-up/down label."""

    prompt: Text
    completion: Text
    desirable: bool
    system: str | None = None
    weight: float = 1.0
    source: str = ""


@dataclass
class TokenizedPair:
    """A preference pair after tokenization and truncation.

    ``prompt_ids`` is an exact prefix of both full sequences; ``chosen_ids`` and
    ``rejected_ids`` are the completion tokens only, each ending with EOS exactly once.
    ``index`` is the position of the example in its dataset (used as the key of cached
    reference log-probs).
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    index: int = 0
    preference: float = 1.0
    weight: float = 1.0
    source: str = ""
    margin: float = 0.0

    @property
    def length(self) -> int:
        """Tokens of the longer of the two full sequences (what the batch must hold)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    @property
    def shared_length(self) -> int:
        """Tokens of the prefix-shared row ``prompt | chosen | rejected`` (:func:`preftune.data.collate.collate_prefix_shared`)."""
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class TokenizedUnpaired:
    """An unpaired (KTO) example after tokenization; same invariants as TokenizedPair."""

    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    index: int = 0
    weight: float = 1.0
    source: str = ""

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass
class DataReport:
    """What the data stage found, kept, cut and dropped; written to ``data_report.json``."""

    files: list[str] = field(default_factory=list)
    format: str = ""
    records: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    findings: dict[str, int] = field(default_factory=dict)
    #: a few example locations per finding, so a user can look at them ("file:line")
    examples: dict[str, list[str]] = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)
    truncation: dict[str, int] = field(default_factory=dict)
    #: unpaired (KTO) records kept, by label: ``desirable`` and ``undesirable``; empty for pairs
    labels: dict[str, int] = field(default_factory=dict)

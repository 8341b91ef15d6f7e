"""Per-example checks, and the DataReport they fill.

Every finding counts RECORDS, and keeps the locations of the first few (``file:line`` for
JSONL, ``file:index`` otherwise) in ``report.examples[finding]``; each drop reason
(``invalid_json``, ``missing_field``, ...) keeps its first few the same way. The seven core
findings are always present in ``report.findings``, zero or not:

``identical_pairs``
    chosen == rejected (after the prompt is split off). DROPPED, always: the preference term
    of every pairwise loss sees equal chosen and rejected log-probs, so it is constant with
    zero gradient (only an added SFT term, as in ORPO or RPO, would learn from the pair, which
    says nothing about preference), and the pair still lowers ``rewards/accuracies`` (equal
    rewards are not "accurate").
``blank_chosen`` / ``blank_rejected``
    the completion is empty or whitespace only (for messages: every content is). KEPT:
    preferring a real answer over silence (or, in harmless data, silence over harm) is a real
    preference; the count tells the user it is there.
``prompt_mismatch``
    HH only: the two transcripts disagree on where the prompt ends (a fake turn inside one
    response). KEPT with the shorter prompt, see :func:`preftune.data.hh.split_hh`.
``duplicate_prompts``
    examples whose (system, prompt) equals that of an EARLIER example of the same load,
    across all its files; the first occurrence is not counted, so N records sharing one prompt
    count N - 1. Only examples that survive the checks above are considered (dropped
    records, ties and identical pairs neither count nor register a prompt). KEPT: several
    comparisons per prompt are normal in preference data.
``ties``
    votes records whose annotators prefer neither response. DROPPED: there is no chosen side.
``non_string``
    records with a text field (prompt, completion, response, message content, system) whose
    value is not a string, e.g. PandaLM's ``true``. Malformed: an error, or with
    ``on_error="skip"`` dropped and counted here and in ``dropped["non_string"]``.

Further findings, also always present:

``blank_prompt``
    the prompt is empty or whitespace only. KEPT.
``blank_completion``
    unpaired (KTO) examples whose completion is blank. KEPT.
``fake_turn_in_completion``
    HH only: a completion contains ``"Human:"`` or ``"Assistant:"``, a turn the model made up.
    KEPT: it is what the data holds; in a rejected response it is even useful signal.
``blank_instruction``
    votes only: the instruction is blank though the input is not (so the prompt is not
    blank). KEPT, and not repaired.
``duplicate_pairs``
    examples whose (system, prompt, chosen, rejected) equals an earlier example's (counted
    like ``duplicate_prompts``, of which they are a part). KEPT: repeated judgments are data,
    but the user should know that they weigh twice (PandaLM has many: several models wrote
    the same answer).
``contradictory_pairs``
    examples whose chosen and rejected are an earlier example's rejected and chosen, for the
    same (system, prompt). KEPT: the two pull against each other, which is what the
    annotators said.
``weighted`` / ``zero_weight``
    records whose ``weight`` field is not 1 / is 0. KEPT: the loss is the weighted mean over
    the step's total weight, so a weight-0 record is read and trained on with no effect.

A finding that drops a record is counted both in ``findings`` and ``dropped`` under the same
name. ``report.records == report.kept + sum(report.dropped.values())`` always holds.
"""

from __future__ import annotations

import hashlib
import json

from preftune.data.records import DataReport, PreferenceExample, Text, UnpairedExample

FINDINGS = (
    "identical_pairs",
    "blank_chosen",
    "blank_rejected",
    "prompt_mismatch",
    "duplicate_prompts",
    "ties",
    "non_string",
)
EXTRA_FINDINGS = (
    "blank_prompt",
    "blank_completion",
    "fake_turn_in_completion",
    "blank_instruction",
    "duplicate_pairs",
    "contradictory_pairs",
    "weighted",
    "zero_weight",
)
#: how many example locations are kept per finding or drop reason
MAX_EXAMPLES = 5


def is_blank(text: Text) -> bool:
    """True for an empty or whitespace-only string, or messages whose contents all are."""
    if isinstance(text, str):
        return text.strip() == ""
    return all(message["content"].strip() == "" for message in text)


class ReportBuilder:
    """Counts records, findings and drops into a :class:`DataReport` as a load goes."""

    def __init__(self, files: list[str]) -> None:
        self.report = DataReport(files=list(files))
        for name in FINDINGS + EXTRA_FINDINGS:
            self.report.findings[name] = 0
        # 64-bit digests, not the texts: memory stays small on large datasets.
        self._seen_prompts: set[int] = set()
        self._seen_pairs: set[int] = set()

    def record_read(self) -> None:
        self.report.records += 1

    def note(self, finding: str, where: str) -> None:
        """Count a finding at location ``where``."""
        self.report.findings[finding] = self.report.findings.get(finding, 0) + 1
        self._example(finding, where)

    def drop(self, reason: str, where: str) -> None:
        """Count a record left out; a reason that is also a finding is counted as both."""
        self.report.dropped[reason] = self.report.dropped.get(reason, 0) + 1
        if reason in self.report.findings:
            self.report.findings[reason] += 1
        self._example(reason, where)

    def check(self, example: PreferenceExample | UnpairedExample, where: str) -> bool:
        """Record the findings of one well-formed example; False when it is to be dropped."""
        if isinstance(example, PreferenceExample):
            if example.chosen == example.rejected:
                self.drop("identical_pairs", where)
                return False
            if is_blank(example.chosen):
                self.note("blank_chosen", where)
            if is_blank(example.rejected):
                self.note("blank_rejected", where)
            pair = _digest(example.system, example.prompt, example.chosen, example.rejected)
            if pair in self._seen_pairs:
                self.note("duplicate_pairs", where)
            elif _digest(example.system, example.prompt, example.rejected, example.chosen) in self._seen_pairs:
                self.note("contradictory_pairs", where)
            self._seen_pairs.add(pair)
        else:
            label = "desirable" if example.desirable else "undesirable"
            self.report.labels[label] = self.report.labels.get(label, 0) + 1
            if is_blank(example.completion):
                self.note("blank_completion", where)
        if is_blank(example.prompt):
            self.note("blank_prompt", where)
        if example.weight != 1.0:
            self.note("weighted", where)
        if example.weight == 0.0:
            self.note("zero_weight", where)
        prompt = _digest(example.system, example.prompt)
        if prompt in self._seen_prompts:
            self.note("duplicate_prompts", where)
        self._seen_prompts.add(prompt)
        self.report.kept += 1
        return True

    def _example(self, name: str, where: str) -> None:
        shown = self.report.examples.setdefault(name, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append(where)


def _digest(*parts: object) -> int:
    """A 64-bit fingerprint of texts or message lists (collisions: ~1e-8 at a million keys)."""
    data = json.dumps(parts, ensure_ascii=False).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")

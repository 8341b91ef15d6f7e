"""Input formats: which one a record is in, and how it becomes a PreferenceExample.

Five formats, named as ``data.format`` takes them:

``explicit``
    ``prompt``, ``chosen``, ``rejected`` strings; optional ``system``.
``conversational``
    ``chosen`` and ``rejected`` are lists of ``{"role", "content"}`` messages (roles system,
    user, assistant). With a ``prompt`` (messages, or a string taken as one user message) the
    completions are the messages after it; a completion that repeats the prompt first (as in
    UltraFeedback-binarized) has it removed. Without a prompt, the prompt is the leading
    messages both sides share and each completion is what follows, starting at an assistant
    message.
``hh``
    Anthropic HH-RLHF transcripts: ``chosen`` / ``rejected`` strings of ``"\\n\\nHuman: ..."`` and
    ``"\\n\\nAssistant: ..."`` turns. See :mod:`preftune.data.hh`.
``votes``
    PandaLM-style annotator votes: ``instruction``, ``input``, ``response1``, ``response2``,
    ``annotator1..N`` (0 tie, 1 response1 better, 2 response2 better). See :func:`tally_votes`.
``unpaired``
    ``prompt``, ``completion``, ``label`` (bool) for KTO; gives an UnpairedExample.

Every format takes an optional ``weight``: the record's weight in the loss (finite, >= 0; 1 when
absent), refused by record otherwise.

A malformed record raises :class:`~preftune.errors.DataError` naming file, line or record, and
field; its ``reason`` is the key under which a skipped record is counted.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from preftune.data.fields import Fields, describe, number, record_weight
from preftune.data.hh import HH_ASSISTANT, HH_TURN_MARKERS, split_hh
from preftune.data.readers import RawRecord, parse_json_cell
from preftune.data.records import PreferenceExample, UnpairedExample
from preftune.errors import DataError

FORMATS = ("explicit", "conversational", "hh", "votes", "unpaired", "completion", "messages")
#: formats whose records are single completions (UnpairedExample), not pairs
SINGLE_FORMATS = frozenset({"unpaired", "completion", "messages"})
_ANNOTATOR = re.compile(r"annotator(\d+)$")


@dataclass
class Converted:
    """A record after its format is applied.

    ``notes`` are findings only the format can see (``prompt_mismatch``,
    ``fake_turn_in_completion``, ``blank_instruction``). ``drop`` names why a well-formed
    record is left out (``ties``: no side is preferred); ``example`` is then ``None``.
    """

    example: PreferenceExample | UnpairedExample | None
    notes: tuple[str, ...] = ()
    drop: str | None = None


def rename_columns(data: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """Rename the file's fields to ours: ``columns`` maps our name -> the file's name."""
    if not columns:
        return data
    renamed = {k: v for k, v in data.items() if k not in columns.values()}
    for ours, theirs in columns.items():
        if theirs in data:
            renamed[ours] = data[theirs]
        else:  # the mapped field is missing: never fall back on the file's own field of our name
            renamed.pop(ours, None)
    return renamed


def detect_format(raw: RawRecord, data: dict[str, Any]) -> str:
    """The format of a file, from the keys (and value types) of its first good record."""
    keys = set(data)
    if {"chosen", "rejected"} <= keys:
        chosen = parse_json_cell(data["chosen"]) if raw.from_text else data["chosen"]
        if isinstance(chosen, list):
            return "conversational"
        return "explicit" if "prompt" in keys else "hh"
    if {"response1", "response2"} <= keys and any(_ANNOTATOR.match(k) for k in keys):
        return "votes"
    if {"prompt", "completion", "label"} <= keys:
        return "unpaired"
    if "prompt" in keys and ({"completion", "response"} & keys):
        return "completion"
    if "messages" in keys:
        return "messages"
    raise DataError(
        f"cannot tell the format from the fields {sorted(keys)}; expected prompt/chosen/rejected "
        "(explicit), chosen/rejected messages (conversational), chosen/rejected transcripts (hh), "
        "response1/response2/annotatorN (votes), prompt/completion/label (unpaired), "
        "prompt/completion or prompt/response (completion: SFT, scoring) or messages (a chat: SFT). "
        "Name the format, or map your fields with columns (--columns prompt=question,...)",
        file=raw.file,
        line=raw.line,
        record=raw.index if raw.line is None else None,
        reason="unknown_format",
    )


def convert(
    raw: RawRecord, data: dict[str, Any], fmt: str, *, system: str | None, columns: dict[str, str],
    prompt_marker: str = HH_ASSISTANT,
) -> Converted:
    """Apply format ``fmt`` to one record (fields already renamed); raise DataError if malformed.
    Whole-text pairs (``hh``) split after the last ``prompt_marker``."""
    fields = Fields(raw, data, columns, prompt_marker)
    converted = _CONVERTERS[fmt](fields, system)
    if converted.example is not None:
        converted.example.weight = record_weight(fields)  # every format may carry one
    return converted


# --------------------------------------------------------------------------- formats
def _explicit(f: Fields, system: str | None) -> Converted:
    example = PreferenceExample(
        prompt=f.text("prompt"),
        chosen=f.text("chosen"),
        rejected=f.text("rejected"),
        system=f.system(system),
        source=f.raw.location,
        margin=_margin(f),
    )
    return Converted(example)


def _margin(f: Fields) -> float:
    """The optional ``margin`` field (reward-model training: how much better chosen is)."""
    return number(f, "margin", 0.0)


def _conversational(f: Fields, system: str | None) -> Converted:
    chosen, rejected = f.messages("chosen"), f.messages("rejected")
    prompt_value = f.chat("prompt", required=False)
    if prompt_value is not None:
        if isinstance(prompt_value, str):
            prompt = [{"role": "user", "content": prompt_value}]
        else:
            prompt = f.messages("prompt", prompt_value)
        chosen, rejected = _strip_repeated_prompt(f, prompt, chosen, rejected)
    else:
        prompt, chosen, rejected = _split_shared_prefix(f, chosen, rejected)
    for field, completion in (("chosen", chosen), ("rejected", rejected)):
        if completion[0]["role"] != "assistant":
            role = completion[0]["role"]
            problem = f"the completion starts with a {role} message, not an assistant message"
            raise f.error(field, problem, "wrong_role")
    has_system_message = bool(prompt) and prompt[0]["role"] == "system"
    record_system = f.system(None)
    example = PreferenceExample(
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        # The default system prompt applies only where the record brings none of its own.
        system=record_system if has_system_message or record_system else system,
        source=f.raw.location,
    )
    return Converted(example)


def _strip_repeated_prompt(f: Fields, prompt: list, chosen: list, rejected: list) -> tuple[list, list]:
    n = len(prompt)
    starts = [len(side) > n and side[:n] == prompt for side in (chosen, rejected)]
    if all(starts):
        return chosen[n:], rejected[n:]
    if any(starts):
        field = "rejected" if starts[0] else "chosen"
        raise f.error(field, "does not start with the prompt messages, but the other side does", "prompt_diverges")
    return chosen, rejected


def _split_shared_prefix(f: Fields, chosen: list, rejected: list) -> tuple[list, list, list]:
    """Prompt = the messages both sides share; each completion starts where they part."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k == min(len(chosen), len(rejected)):
        k -= 1  # one side is a prefix of the other: its last message is its completion
    if chosen[k]["role"] != "assistant" or rejected[k]["role"] != "assistant":
        raise f.error(
            "chosen",
            f"chosen and rejected part at message {k}, which is not an assistant message on both "
            "sides, so they do not answer the same prompt",
            "prompt_diverges",
        )
    return chosen[:k], chosen[k:], rejected[k:]


def _hh(f: Fields, system: str | None) -> Converted:
    chosen, rejected, marker = f.text("chosen"), f.text("rejected"), f.prompt_marker
    for field, text in (("chosen", chosen), ("rejected", rejected)):
        if marker not in text:
            problem = f"has no {marker!r} turn (data.prompt_marker), so there is no prompt to split off"
            raise f.error(field, problem, "no_assistant_marker")
    prompt, mismatch = split_hh(chosen, rejected, marker)
    if not (chosen.startswith(prompt) and rejected.startswith(prompt)):
        problem = "chosen and rejected are different conversations (they differ before the last Assistant turn)"
        raise f.error("rejected", problem, "prompt_diverges")
    chosen_completion, rejected_completion = chosen[len(prompt) :], rejected[len(prompt) :]
    notes = ["prompt_mismatch"] if mismatch else []
    if any(m in c for m in HH_TURN_MARKERS for c in (chosen_completion, rejected_completion)):
        notes.append("fake_turn_in_completion")
    example = PreferenceExample(
        prompt=prompt, chosen=chosen_completion, rejected=rejected_completion,
        system=system, source=f.raw.location,
    )
    return Converted(example, tuple(notes))


def tally_votes(votes: list[int]) -> tuple[int, float]:
    """The winning response (1 or 2; 0 for a tie) and the winner's share of the non-tie votes.

    A response wins only with a strict plurality of ALL votes: more votes than the other
    response and more than the tie votes. Otherwise (equal votes, or "tie" the most common
    label, e.g. 0-0-2) the record is a tie. ``preference`` is the winner's fraction of the
    votes for either response: 2-2-2 -> 1.0, 2-1-2 -> 2/3, 1-0-1 -> 1.0 (a tie vote says
    neither is better, so it does not weaken the label).
    """
    counts = Counter(votes)
    for winner, loser in ((1, 2), (2, 1)):
        if counts[winner] > counts[loser] and counts[winner] > counts[0]:
            return winner, counts[winner] / (counts[winner] + counts[loser])
    return 0, 0.0


def _votes(f: Fields, system: str | None) -> Converted:
    instruction = f.text("instruction")
    extra_input = f.text("input", required=False) or ""
    responses = {1: f.text("response1"), 2: f.text("response2")}
    annotators = sorted((k for k in f.data if _ANNOTATOR.match(k)), key=lambda k: int(k[9:]))
    if not annotators:
        raise f.error("annotator1", "is missing: a votes record needs annotator1..N", "missing_field")
    votes = [_vote(f, k) for k in annotators]
    winner, preference = tally_votes(votes)
    if winner == 0:
        return Converted(None, drop="ties")  # counted as a finding and a drop by the caller
    prompt = instruction + ("\n\n" + extra_input if extra_input else "")
    notes = ("blank_instruction",) if not instruction.strip() else ()
    example = PreferenceExample(
        prompt=prompt, chosen=responses[winner], rejected=responses[3 - winner],
        system=system, preference=preference, source=f.raw.location,
    )
    return Converted(example, notes)


def _vote(f: Fields, field: str) -> int:
    value = f.get(field)
    if f.raw.from_text and isinstance(value, str) and value.strip() in ("0", "1", "2"):
        value = int(value)
    if isinstance(value, bool) or value not in (0, 1, 2):
        raise f.error(field, f"must be 0 (tie), 1 or 2, got {describe(value)}", "wrong_type")
    return int(value)


def _unpaired(f: Fields, system: str | None) -> Converted:
    prompt, completion = f.chat("prompt"), f.chat("completion")
    if isinstance(completion, list) or isinstance(prompt, list):
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else f.messages("prompt", prompt)
        completion = f.messages("completion", completion)
    else:
        prompt, completion = f.text("prompt"), f.text("completion")
    example = UnpairedExample(
        prompt=prompt, completion=completion, desirable=_label(f),
        system=f.system(system), source=f.raw.location,
    )
    return Converted(example)


def _label(f: Fields) -> bool:
    value = f.get("label")
    if f.raw.from_text and isinstance(value, str):
        value = {"true": True, "false": False, "1": True, "0": False}.get(value.strip().lower(), value)
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):  # 0/1 and 0.0/1.0 (a float column), nothing in between
        return bool(value)
    raise f.error("label", f"must be a boolean (true = desirable), got {describe(value)}", "wrong_type")


def _completion(f: Fields, system: str | None) -> Converted:
    """prompt + completion (or response): one demonstration (SFT) or one response to score."""
    name = "completion" if "completion" in f.data else "response"
    prompt, completion = f.chat("prompt"), f.chat(name)
    if isinstance(completion, list) or isinstance(prompt, list):
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else f.messages("prompt", prompt)
        completion = f.messages(name, completion)
    else:
        prompt, completion = f.text("prompt"), f.text(name)
    return Converted(UnpairedExample(prompt=prompt, completion=completion, desirable=True,
                                     system=f.system(system), source=f.raw.location))


def _messages(f: Fields, system: str | None) -> Converted:
    """A chat: the prompt is every message before the last, which must be the assistant's."""
    messages = f.messages("messages")
    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
        raise f.error(f"messages[{last}]", f"must be the assistant's reply (the completion), got role {messages[last]['role']!r}", "wrong_type")
    if last == 0:
        raise f.error("messages", "holds only the assistant's reply; there is no prompt before it", "missing_field")
    return Converted(UnpairedExample(prompt=messages[:last], completion=[messages[last]], desirable=True,
                                     system=f.system(system), source=f.raw.location))


_CONVERTERS = {
    "completion": _completion,
    "messages": _messages,
    "explicit": _explicit,
    "conversational": _conversational,
    "hh": _hh,
    "votes": _votes,
    "unpaired": _unpaired,
}

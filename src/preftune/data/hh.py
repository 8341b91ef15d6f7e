"""Anthropic HH-RLHF transcripts: where the prompt ends and the two responses begin.

Each side of an HH pair is a whole conversation of ``"\\n\\nHuman: ..."`` and
``"\\n\\nAssistant: ..."`` turns; the prompt is everything up to and including the last
Assistant marker, the response what follows it. Other plain-text pairs whose chosen and rejected
are whole texts split the same way at their own marker (``data.prompt_marker``), never at the
longest common prefix of the two texts (which runs past the marker whenever both responses
begin with the same word).
"""

from __future__ import annotations

HH_ASSISTANT = "\n\nAssistant:"
#: turn markers that should not appear inside an HH completion (the model wrote a fake turn)
HH_TURN_MARKERS = ("Human:", "Assistant:")


def hh_prompt(text: str, marker: str = HH_ASSISTANT) -> str:
    """HH's prompt of one transcript: up to and including its LAST ``"\\n\\nAssistant:"``.

    ``P(s) = s[: s.rfind("\\n\\nAssistant:") + len("\\n\\nAssistant:")]``, as in the data's
    ``edge_cases.json``; the caller checks the marker is present.
    """
    return text[: text.rfind(marker) + len(marker)]


def split_hh(chosen: str, rejected: str, marker: str = HH_ASSISTANT) -> tuple[str, bool]:
    """The shared prompt of an HH pair, and whether the two sides disagreed about it.

    Normally ``hh_prompt(chosen) == hh_prompt(rejected)``. When a response contains a fake
    ``"\\n\\nAssistant:"`` turn written by the model, that side's last marker lies inside its
    response, so its ``hh_prompt`` is longer. The rule: the prompt is the SHORTER of the two,
    provided both transcripts start with it; the fake turn then stays inside that side's
    completion (and is reported as ``fake_turn_in_completion``). The record is kept and
    counted as ``prompt_mismatch``. If the longer transcript does not start with the shorter
    prompt, the two sides are different conversations: a ``prompt_diverges`` error.
    """
    chosen_prompt, rejected_prompt = hh_prompt(chosen, marker), hh_prompt(rejected, marker)
    if chosen_prompt == rejected_prompt:
        return chosen_prompt, False
    return min(chosen_prompt, rejected_prompt, key=len), True

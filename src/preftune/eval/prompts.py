"""Prompt files: the prompts ``preftune generate`` and ``preftune eval`` sample from.

A prompt file holds records with a ``prompt`` (text or chat messages) and an optional
``system``; any preference or completion data that ``load_examples`` reads works too, and its
prompts are taken (each once).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.data.records import Text
from preftune.errors import DataError

#: A prompt: plain text, or a list of chat messages ({"role", "content"}).
Prompt = Text


@dataclass
class PromptRecord:
    """A prompt read from a file, with its system prompt and where it came from (``file:line``)."""

    prompt: Prompt
    system: str | None = None
    source: str = ""


def read_prompts(path: str | Path, *, max_records: int | None = None) -> list[PromptRecord]:
    """Prompts from a file: records with a ``prompt`` field (text or chat messages; optional
    ``system``), or any preference/completion data ``load_examples`` reads, taking its prompts.

    Prompts of preference data are de-duplicated (a prompt with several pairs is asked once);
    a prompt-only file is taken as written, one prompt per record.
    """
    from preftune.data import load_examples
    from preftune.data.formats import detect_format
    from preftune.data.readers import read_records

    first = next(read_records(path, max_records=1), None)
    if first is None:
        raise DataError("the file holds no record", file=str(path), reason="empty")
    if first.error:
        raise first.error
    try:
        detect_format(first, first.data)
        is_data = True
    except DataError:
        is_data = False
    if not is_data:
        return [_prompt_record(raw) for raw in read_records(path, max_records=max_records)]
    examples = load_examples(path, max_records=max_records).examples
    seen: set[str] = set()
    records = []
    for ex in examples:
        key = json.dumps([ex.prompt, ex.system], sort_keys=True)
        if key not in seen:
            seen.add(key)
            records.append(PromptRecord(ex.prompt, ex.system, ex.source))
    return records


def _prompt_record(raw: Any) -> PromptRecord:
    from preftune.data.readers import parse_json_cell

    if raw.error:
        raise raw.error
    data = raw.data
    if not isinstance(data, dict) or "prompt" not in data:
        raise raw.error_at("a prompt record needs a 'prompt' field (text or a list of chat messages)",
                           field="prompt", reason="missing_field")
    prompt = parse_json_cell(data["prompt"]) if raw.from_text else data["prompt"]
    if isinstance(prompt, list):
        for message in prompt:
            if not (isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
                raise raw.error_at(f"a chat message needs 'role' and 'content' strings, got {message!r}",
                                   field="prompt", reason="bad_message")
    elif not isinstance(prompt, str) or not prompt:
        raise raw.error_at(f"the prompt must be non-empty text or a list of chat messages, got {prompt!r}",
                           field="prompt", reason="bad_prompt")
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise raw.error_at(f"'system' must be text, got {system!r}", field="system", reason="bad_system")
    return PromptRecord(prompt, system or None, raw.location)

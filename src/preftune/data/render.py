"""Examples -> the texts :mod:`preftune.data.tokenize` encodes: a plain-text prompt verbatim (a
system prompt joined in front), chat messages through the tokenizer's chat template (rules in
that module's docstring, "Rendering")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from preftune.data.records import Text
from preftune.errors import TokenizationError


def render(
    tokenizer: Any, prompt: Text, system: str | None, completions: Sequence[Text], where: str, *, chat: bool
) -> tuple[str, list[Any], list[str | None]]:
    """(prompt text, completion texts, the whole conversations' texts (chat; else None)) of one
    example, per the rules in the module docstring; a chat completion whose conversation does not
    start with the rendered prompt has no text of its own (None)."""
    for value in (prompt, *completions):
        if not isinstance(value, (str, list)):
            kind = type(value).__name__
            raise TokenizationError(f"{where}: a prompt or completion must be text or messages, got {kind}")
    if not chat:
        return (f"{system}\n\n{prompt}" if system else prompt), list(completions), [None] * len(completions)
    if not getattr(tokenizer, "chat_template", None):
        raise TokenizationError(
            f"{where}: the data holds chat messages, but the tokenizer has no chat template. Use a tokenizer "
            "with one (set `chat_template` in its tokenizer_config.json), or give prompts and completions as text."
        )
    messages = _with_system(_as_messages(prompt, "user"), system, where)
    prompt_text = _apply_template(tokenizer, messages, where, generation_prompt=True)
    texts: list[str | None] = []
    fulls: list[str | None] = []
    for completion in completions:
        conversation = messages + _as_messages(completion, "assistant")
        full = _apply_template(tokenizer, conversation, where, generation_prompt=False)
        # a template that renders the prompt otherwise inside the conversation (one that rewrites
        # earlier turns): no completion text of its own; split at the ids (_split_chat)
        texts.append(full[len(prompt_text) :] if full.startswith(prompt_text) else None)
        fulls.append(full)
    return prompt_text, texts, fulls


def _as_messages(value: Text, role: str) -> list[dict[str, str]]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def _with_system(messages: list[dict[str, str]], system: str | None, where: str) -> list[dict[str, str]]:
    if not system:
        return messages
    if messages and messages[0].get("role") == "system":
        if messages[0].get("content") != system:
            raise TokenizationError(
                f"{where}: the record has a system prompt ({system[:40]!r}) and its prompt opens with a different "
                "system message; keep one of them."
            )
        return messages
    return [{"role": "system", "content": system}] + messages


def _apply_template(tokenizer: Any, messages: list[dict[str, str]], where: str, *, generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja's TemplateError, or a template's own raise_exception
        raise TokenizationError(f"{where}: the chat template cannot render this conversation: {err}") from None
    if not isinstance(text, str):
        raise TokenizationError(f"{where}: the chat template returned {type(text).__name__}, not text")
    return text

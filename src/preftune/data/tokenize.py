"""Examples -> token ids: the prefix, BOS, EOS and truncation rules, checked on every record.

Rendering
    A plain-text prompt is used verbatim (formats such as HH arrive pre-formatted, so no chat
    template is applied to them); a system prompt is joined in front as
    ``system + "\\n\\n" + prompt``. A prompt made of chat messages is rendered with the
    tokenizer's chat template: the prompt with ``add_generation_prompt=True``, and the whole
    conversation (prompt + completion messages) without it; the completion's text is the
    rendered conversation minus the rendered prompt, so a template that renders the prompt
    differently on its own is split at the ids (below). The system prompt becomes a leading
    ``{"role": "system"}`` message unless the prompt already opens with one (a different one is
    an error). If any of prompt or completions is a message list, the whole example is a chat:
    a plain-text prompt becomes one user message, a plain-text completion one assistant message.
    Messages without a chat template are a :class:`TokenizationError`.

Ids
    The prompt and each completion are tokenized SEPARATELY and concatenated, so the prompt's
    ids are exactly what the model sees when it is prompted at inference (see
    :func:`encode_prompt`) and no BPE merge crosses the boundary. (Tokenizing prompt +
    completion as one text would merge e.g. ``"Hel" + "lo"`` into ``"Hello"`` and move the
    boundary.) Special tokens written in the text (``<|im_start|>``, a pre-rendered ``<s>``) are
    parsed as special tokens, as in every chat template. (A SentencePiece tokenizer that
    prefixes every text with a space, ``Metaspace(prepend_scheme="first")``, gives a completion
    written without a leading space one anyway, as TRL's tokenization does too.)

Chat data: exactly ``apply_chat_template``
    For chat examples the whole conversation is tokenized too, and each completion's ids are the
    whole's after the prompt's (:meth:`TokenizeStream._split_chat`): separate tokenization of the
    completion text can differ (a merge across the boundary, a normalizer that prepends a space;
    counted in ``report.findings['completion_retokenized']``). Where the prompt's ids are not a
    prefix of the whole (a generation prompt that ends in a space, a template that rewrites earlier
    turns), the prompt is cut to the longest prefix the wholes share, as TRL does, and the record
    is counted in ``report.findings['prompt_not_prefix']`` and warned about.
    So the ids are the rendered template's and nothing else: the prompt's ids
    equal ``apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)`` and prompt +
    completion equal ``apply_chat_template(prompt + completion, tokenize=True)`` (tested on
    ChatML, Llama-3, Mistral-instruct, Gemma and Zephyr styles). So no BOS is added that the
    template does not write, and a turn the template closes with a special token of its own
    (``<|im_end|>\\n``, ``<|eot_id|>``, ``<end_of_turn>\\n``, ``</s>``) is kept as rendered,
    whitespace after it included, with no EOS appended; generation stops at that token too
    (:func:`turn_end_ids`). Only a template whose assistant turn ends in no special token gets
    EOS appended.

BOS (plain text)
    The prompt gets the special tokens that the tokenizer's own post-processor puts before a
    text (usually BOS; nothing for tokenizers that add none), UNLESS the text already starts
    with them: BOS is never doubled. A prompt that still starts with BOS twice is an error.

EOS (plain text)
    Each completion ends with EOS exactly once: appended unless the text already ends with it;
    whitespace after a final EOS is dropped so EOS is the last token. A completion ending with
    EOS twice is an error.

Truncation (``max_length``, ``max_prompt_length``), in this order:
    1. A prompt longer than ``max_prompt_length`` keeps its END (left truncation); a leading
       BOS stays at the front and counts towards the limit. Counted as ``prompt_cut``.
    2. ``room = max_length - len(prompt)``. A completion longer than ``room`` keeps its first
       ``room`` tokens and so LOSES its EOS (as in TRL): appending EOS to a response cut
       mid-sentence would teach the model to stop there. Counted as ``completion_cut`` (records),
       and ``chosen_cut`` / ``rejected_cut`` for pairs.
    3. A completion is never emptied: when ``room < 1`` (the prompt alone fills ``max_length``,
       even after step 1) the record cannot fit. With ``on_overflow="drop"`` it is left out and
       counted in ``report.truncation["dropped"]`` and ``report.dropped["too_long"]`` (and
       ``report.kept`` goes down); with ``on_overflow="error"`` it is a
       :class:`TokenizationError` naming the record and its lengths. Cutting is never fatal.
    A record dropped is counted only as dropped, not also as cut. The first few of each are
    named in ``report.examples["too_long"]`` and ``report.examples["truncated"]``.

``report.tokens`` holds length percentiles (p50, p90, p99, max; nearest-rank) of the prompt,
each completion and the full sequence (prompt + the longer completion, ``TokenizedPair.length``),
measured BEFORE truncation over every example given.

Bounded work: only a window of characters around what truncation can keep is encoded
(:mod:`preftune.data.window`), so one huge record costs no more than a long one.
"""

from __future__ import annotations

import warnings
from array import array
from collections.abc import Sequence
from typing import Any

from preftune.data.codec import Codec, encode_texts
from preftune.data.records import (
    DataReport,
    PreferenceExample,
    Text,
    TokenizedPair,
    TokenizedUnpaired,
    UnpairedExample,
)
from preftune.data.render import render
from preftune.data.validate import MAX_EXAMPLES
from preftune.data.window import Window
from preftune.errors import ConfigError, TokenizationError
from preftune.stats import quantiles

ON_OVERFLOW = ("drop", "error")
#: Nearest-rank percentiles reported in ``report.tokens``.
PERCENTILES = (50, 90, 99)


def tokenize_pairs(
    examples: list[PreferenceExample],
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    on_overflow: str = "drop",
    report: DataReport | None = None,
) -> list[TokenizedPair]:
    """Tokenize and truncate preference pairs (rules in the module docstring).

    ``TokenizedPair.index`` is the example's position in ``examples``; preference, weight and
    source are copied. With ``report`` (the loader's, whose ``kept`` is ``len(examples)``),
    ``report.tokens`` and ``report.truncation`` are filled and drops are counted.
    """
    return _tokenize_all("pairs", examples, tokenizer, max_length, max_prompt_length, on_overflow, report)


def tokenize_unpaired(
    examples: list[UnpairedExample],
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    on_overflow: str = "drop",
    report: DataReport | None = None,
) -> list[TokenizedUnpaired]:
    """Tokenize and truncate unpaired (KTO) examples; same rules as :func:`tokenize_pairs`."""
    return _tokenize_all("unpaired", examples, tokenizer, max_length, max_prompt_length, on_overflow, report)


def _tokenize_all(kind: str, examples: list[Any], tokenizer: Any, max_length: int, max_prompt_length: int | None,
                  on_overflow: str, report: DataReport | None) -> list[Any]:
    """Every example through one :class:`TokenizeStream`; its lengths, cuts and drops go into ``report``."""
    stream = TokenizeStream(tokenizer, kind, max_length=max_length, max_prompt_length=max_prompt_length, on_overflow=on_overflow)
    items = stream.add(examples)
    if report is not None:
        stream.fill(report)
    return items


def encode_prompt(tokenizer: Any, prompt: Text, system: str | None = None) -> list[int]:
    """The ids of a prompt exactly as training sees them (no truncation): use it to generate."""
    codec = Codec.of(tokenizer)
    chat = isinstance(prompt, list)
    text, _, _ = render(tokenizer, prompt, system, (), "prompt", chat=chat)
    return codec.prompts([text], ["prompt"], [chat])[0]


def turn_end_ids(tokenizer: Any) -> list[int]:
    """The special token the chat template closes an assistant turn with (``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``), as a list of one id; empty without a template or when
    the turn ends in no special token. Generation stops there too."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    try:
        _, _, (text,) = render(tokenizer, [{"role": "user", "content": "x"}], None, ("y",), "probe", chat=True)
    except TokenizationError:
        return []
    codec = Codec.of(tokenizer)
    ids = encode_texts(tokenizer, [text], special=False)[0]
    while ids and not codec.closes_turn(ids[-1:]) and codec.closes_turn(ids):
        ids = ids[:-1]  # whitespace after the turn's end
    return ids[-1:] if ids and codec.closes_turn(ids[-1:]) else []


# --------------------------------------------------------------------------- the pipeline
_Row = tuple[Text, str | None, tuple, str]  # prompt, system, completions, source


class TokenizeStream:
    """:func:`tokenize_pairs` (``kind="pairs"``) or :func:`tokenize_unpaired` (``"unpaired"``) a
    chunk of examples at a time, so a large dataset is never held whole: :meth:`add` gives each
    chunk's items (``index`` counts examples across chunks), and :meth:`fill` writes the report of
    every chunk so far (lengths, cuts, drops) exactly as one call on all of them would."""

    def __init__(self, tokenizer: Any, kind: str, *, max_length: int, max_prompt_length: int | None = None,
                 on_overflow: str = "drop") -> None:
        _check_limits(max_length, max_prompt_length, on_overflow)
        self.tokenizer, self.kind = tokenizer, kind
        self.names = ("chosen", "rejected") if kind == "pairs" else ("completion",)
        self.limits = (max_length, max_prompt_length, on_overflow)
        self.codec = Codec.of(tokenizer)
        self.window = Window(tokenizer, max_length)
        self.lengths = {name: array("q") for name in ("prompt", *self.names, "full")}
        self.counts = {"prompt_cut": 0, "completion_cut": 0, **{f"{n}_cut": 0 for n in self.names if len(self.names) > 1},
                       "dropped": 0}
        self.dropped_at: list[str] = []
        self.cut_at: list[str] = []
        #: chat rows whose ids were split from the whole conversation (:meth:`_split_chat`)
        self.split_counts = {"completion_retokenized": 0, "prompt_not_prefix": 0}
        self.split_at: dict[str, list[str]] = {name: [] for name in self.split_counts}
        self.seen = 0

    def add(self, examples: Sequence[PreferenceExample | UnpairedExample]) -> list[Any]:
        """Tokenize and fit one chunk; returns its items (dropped examples left out, counted)."""
        start, self.seen = self.seen, self.seen + len(examples)
        if self.kind == "pairs":
            rows = [(ex.prompt, ex.system, (ex.chosen, ex.rejected), ex.source) for ex in examples]
            return [TokenizedPair(prompt_ids=prompt, chosen_ids=comps[0], rejected_ids=comps[1], index=start + i,
                                  preference=float(examples[i].preference), weight=float(examples[i].weight),
                                  source=examples[i].source, margin=float(examples[i].margin))
                    for i, prompt, comps in self._tokenize(rows, start)]
        rows = [(ex.prompt, ex.system, (ex.completion,), ex.source) for ex in examples]
        return [TokenizedUnpaired(prompt_ids=prompt, completion_ids=comps[0], desirable=bool(examples[i].desirable),
                                  index=start + i, weight=float(examples[i].weight), source=examples[i].source)
                for i, prompt, comps in self._tokenize(rows, start)]

    def fill(self, report: DataReport) -> None:
        """Fill ``report.tokens`` and ``report.truncation`` and count the drops, over every chunk added."""
        _fill_report(report, self.lengths, self.counts, self.dropped_at, self.cut_at)
        for name, count in self.split_counts.items():
            if count:
                report.findings[name] = report.findings.get(name, 0) + count
                report.examples.setdefault(name, []).extend(self.split_at[name][:MAX_EXAMPLES])
        if self.split_counts["prompt_not_prefix"]:
            warnings.warn(f"{self.split_counts['prompt_not_prefix']} chat record(s) (e.g. {', '.join(self.split_at['prompt_not_prefix'])}): "
                          "the tokenized prompt is not a prefix of the tokenized conversation (a generation prompt ending in "
                          "a space, or a template that rewrites earlier turns); the prompt ends where they diverge, as in "
                          "TRL, so training sees a slightly other context than generation does (counted as prompt_not_prefix "
                          "in data_report.json and `data inspect`).", stacklevel=2)

    def _tokenize(self, rows: list[_Row], start: int) -> list[tuple[int, list[int], list[list[int]]]]:
        """Render, encode, check, measure and fit every row; returns (position in rows, prompt, completions)."""
        codec, window, names = self.codec, self.window, self.names
        max_length, max_prompt_length, on_overflow = self.limits
        prompt_texts, completion_texts, sources, chats, rendered = [], [], [], [], {}
        for i, (prompt, system, completions, source) in enumerate(rows):
            where = f"record {source}" if source else f"example {start + i}"
            chat = isinstance(prompt, list) or any(isinstance(c, list) for c in completions)
            prompt_text, texts, fulls = render(self.tokenizer, prompt, system, completions, where, chat=chat)
            prompt_texts.append(prompt_text)
            completion_texts.extend((t or "") if chat else codec.trim_after_eos(t) for t in texts)
            sources.append(where)
            chats.append(chat)
            if chat:
                rendered[i] = (prompt_text, texts, fulls)
        prompts = _encode(codec.prompts, [window.prompt(t) for t in prompt_texts], prompt_texts, sources, chats, window)
        flat = _encode(codec.completions, [window.completion(t) for t in completion_texts], completion_texts,
                       [w for w in sources for _ in names], [c for c in chats for _ in names], window)
        k = len(names)
        completions = [flat[i * k : (i + 1) * k] for i in range(len(rows))]
        del prompt_texts, completion_texts, flat
        for i, (prompt_text, texts, fulls) in rendered.items():
            prompts[i], completions[i] = self._split_chat(prompt_text, texts, fulls, prompts[i], completions[i], sources[i],
                                                          rows[i][3] or str(start + i))

        self.lengths["prompt"].extend(len(p) for p in prompts)
        for j, name in enumerate(names):
            self.lengths[name].extend(len(c[j]) for c in completions)
        self.lengths["full"].extend(len(p) + max(len(x) for x in c) for p, c in zip(prompts, completions))

        counts, fitted = self.counts, []
        for i, (prompt, comps) in enumerate(zip(prompts, completions)):
            fit = _fit(prompt, comps, max_length, max_prompt_length, codec.bos_id)
            if fit is None:
                if on_overflow == "error":
                    raise TokenizationError(_overflow_message(sources[i], prompt, max_length, max_prompt_length))
                counts["dropped"] += 1
                _note(self.dropped_at, rows[i][3] or str(start + i))
                continue
            new_prompt, new_comps, prompt_cut, cut = fit
            counts["prompt_cut"] += prompt_cut
            counts["completion_cut"] += any(cut)
            if len(names) > 1:
                for name, was_cut in zip(names, cut):
                    counts[f"{name}_cut"] += was_cut
            if prompt_cut or any(cut):
                _note(self.cut_at, rows[i][3] or str(start + i))
            fitted.append((i, new_prompt, new_comps))
        return fitted


    def _split_chat(self, prompt_text: str, texts: list[str | None], fulls: list[str], prompt: list[int],
                    separate: list[list[int]], where: str, label: str) -> tuple[list[int], list[list[int]]]:
        """A chat row's ids as ``apply_chat_template`` gives the whole conversation: each
        completion is the whole's ids after the prompt's, where separate tokenization differs (a
        merge across the boundary, a normalizer that prepends a space). Where the prompt's ids are
        not a prefix of the whole (a generation prompt ending in a space, a template that rewrites
        earlier turns), the prompt is cut to the longest prefix all the wholes share, as TRL does;
        both are counted (``report.findings``)."""
        codec, window = self.codec, self.window
        windowed = window.prompt(prompt_text)
        used = prompt_text if window.too_short(windowed, prompt_text, prompt) else windowed
        if any(t is None for t in texts) and used is not prompt_text:
            raise TokenizationError(f"{where}: the chat template renders the prompt otherwise inside the conversation, and "
                                    "the prompt is too long to split the whole at it; shorten the prompt.")
        wholes = codec.prompts([used + window.completion(t) if t is not None else full for t, full in zip(texts, fulls)],
                               [where] * len(texts), [True] * len(texts))
        shared = min(_common_prefix(prompt, whole) for whole in wholes)
        if shared == 0 or any(len(whole) <= shared for whole in wholes):
            raise TokenizationError(f"{where}: the chat template's conversation shares no prompt with its rendered prompt, "
                                    "or leaves a completion empty after it; this template cannot be split into prompt and completion.")
        completions = [codec.finish(whole[shared:], where, True) for whole in wholes]
        if shared < len(prompt):
            self.split_counts["prompt_not_prefix"] += 1
            _note(self.split_at["prompt_not_prefix"], label)
        elif completions != separate:
            self.split_counts["completion_retokenized"] += 1
            _note(self.split_at["completion_retokenized"], label)
        return prompt[:shared], completions


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _note(locations: list[str], where: str) -> None:
    """Keep the first few locations of a finding (the report names no more)."""
    if len(locations) < MAX_EXAMPLES:
        locations.append(where)


def _encode(encode: Any, windowed: list[str], texts: list[str], sources: list[str], chats: list[bool],
            window: Window) -> list[list[int]]:
    """``encode`` the windowed texts; one whose window holds too few tokens is encoded whole."""
    ids = encode(windowed, sources, chats)
    for i, (short, text) in enumerate(zip(windowed, texts)):
        if window.too_short(short, text, ids[i]):
            ids[i] = encode([text], [sources[i]], [chats[i]])[0]
    return ids


def _check_limits(max_length: int, max_prompt_length: int | None, on_overflow: str) -> None:
    if not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"max_length must be an integer of at least 2, got {max_length!r}")
    if max_prompt_length is not None and (not isinstance(max_prompt_length, int) or max_prompt_length < 1):
        raise ConfigError(f"max_prompt_length must be a positive integer or None, got {max_prompt_length!r}")
    if on_overflow not in ON_OVERFLOW:
        raise ConfigError(f"on_overflow must be one of {', '.join(ON_OVERFLOW)}, got {on_overflow!r}")


def _fit(
    prompt: list[int], completions: list[list[int]], max_length: int, max_prompt_length: int | None, bos_id: int | None
) -> tuple[list[int], list[list[int]], bool, list[bool]] | None:
    """Apply the truncation policy to one record; None when it cannot fit."""
    prompt_cut = max_prompt_length is not None and len(prompt) > max_prompt_length
    if prompt_cut:
        if bos_id is not None and prompt[0] == bos_id:
            # Keep BOS: the model has only ever seen sequences that start with it.
            keep = max_prompt_length - 1
            prompt = prompt[:1] + prompt[len(prompt) - keep :] if keep else prompt[:1]
        else:
            prompt = prompt[len(prompt) - max_prompt_length :]
    room = max_length - len(prompt)
    if room < 1:
        return None
    cut = [len(c) > room for c in completions]
    return prompt, [c[:room] for c in completions], prompt_cut, cut


def _overflow_message(where: str, prompt: list[int], max_length: int, max_prompt_length: int | None) -> str:
    after = ""
    if max_prompt_length:
        after = f", {min(len(prompt), max_prompt_length)} after max_prompt_length={max_prompt_length}"
    return (
        f"{where}: the prompt has {len(prompt)} tokens{after}, which leaves no room for any completion token "
        f"within max_length={max_length}. Raise max_length, set max_prompt_length below it, or set "
        "on_overflow: drop to leave such records out (they are counted)."
    )


def _fill_report(
    report: DataReport, lengths: dict[str, Sequence[int]], counts: dict[str, int], dropped_at: list[str], cut_at: list[str]
) -> None:
    report.tokens = {name: percentiles(values) for name, values in lengths.items()}
    report.truncation = dict(counts)
    if counts["dropped"]:
        report.dropped["too_long"] = report.dropped.get("too_long", 0) + counts["dropped"]
        report.kept -= counts["dropped"]
        report.examples.setdefault("too_long", []).extend(dropped_at[:MAX_EXAMPLES])
    if cut_at:
        report.examples.setdefault("truncated", []).extend(cut_at[:MAX_EXAMPLES])


def percentiles(values: Sequence[int]) -> dict[str, int]:
    """Nearest-rank p50/p90/p99 and max (:mod:`preftune.stats`); all 0 when there are no values."""
    if not values:
        return {**{f"p{p}": 0 for p in PERCENTILES}, "max": 0}
    return quantiles(values, PERCENTILES)

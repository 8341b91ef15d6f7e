"""window.py: only what truncation can keep is tokenized, and the result is the same.

For ordinary records (random text, chat and plain, with and without a system prompt and BOS in
the text, cut on either side or not at all) the windowed tokenization equals tokenizing the whole
text and truncating it; a record of 50 MB is tokenized in seconds, and the tokenizer never sees
more than the window.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from preftune.data import codec as codec_module
from preftune.data import window as window_module
from preftune.data.records import PreferenceExample, UnpairedExample
from preftune.data.tokenize import tokenize_pairs, tokenize_unpaired
from preftune.models.tiny import synthetic_corpus, train_tokenizer

WORDS = "Hello world goodness thinking answer don't can't naïve café über 日本語 question reply , . ! \n".split(" ")


@pytest.fixture(scope="module")
def tok() -> Any:
    corpus = synthetic_corpus() + [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 6
    return train_tokenizer(corpus, vocab_size=400)


def text(rng: random.Random, words: int) -> str:
    return "".join(rng.choice(WORDS) + rng.choice(["", " ", "  ", "\n"]) for _ in range(words))


def examples(seed: int, n: int) -> list[PreferenceExample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        def part(role: str) -> Any:
            body = text(rng, rng.choice([0, 1, 3, 20, 200, 2000]) or 1)
            return [{"role": role, "content": body}] if rng.random() < 0.3 else body
        prompt = part("user")
        if isinstance(prompt, str) and rng.random() < 0.2:
            prompt = "<s>" + prompt  # the text brings its own BOS
        out.append(PreferenceExample(prompt=prompt, chosen=part("assistant"), rejected=part("assistant"),
                                     system=text(rng, 5) if rng.random() < 0.2 else None, source=f"t:{i}"))
    return out


@pytest.mark.parametrize("max_length,max_prompt_length", [(4, 2), (16, 8), (64, None), (48, 200), (512, 256)])
def test_windowed_tokenization_equals_whole_text_tokenization_and_truncation(tok: Any, monkeypatch: pytest.MonkeyPatch,
                                                                             max_length: int, max_prompt_length: int | None) -> None:
    data = examples(seed=max_length, n=60)
    kwargs = {"max_length": max_length, "max_prompt_length": max_prompt_length}
    windowed = tokenize_pairs(data, tok, **kwargs)
    unpaired = [UnpairedExample(prompt=ex.prompt, completion=ex.chosen, desirable=True, source=ex.source) for ex in data]
    windowed_unpaired = tokenize_unpaired(unpaired, tok, **kwargs)
    monkeypatch.setattr(window_module, "longest_token", lambda tokenizer: 0)  # no window: the whole texts
    whole = tokenize_pairs(data, tok, **kwargs)
    assert windowed == whole
    assert windowed_unpaired == tokenize_unpaired(unpaired, tok, **kwargs)
    assert any(ex.chosen_ids[-1] != tok.eos_token_id for ex in whole) or max_length >= 512  # some were cut


def test_a_huge_record_is_tokenized_in_seconds_and_only_its_window_reaches_the_tokenizer(
        tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    encode = codec_module.encode_texts

    def spy(tokenizer: Any, texts: list[str], *, special: bool) -> list[list[int]]:
        seen.extend(len(t) for t in texts)
        return encode(tokenizer, texts, special=special)

    monkeypatch.setattr(codec_module, "encode_texts", spy)
    huge = "Hello world goodness " * (50_000_000 // 21)  # 50 MB
    data = [PreferenceExample(prompt=huge, chosen=huge, rejected="short answer", source="big:0"),
            PreferenceExample(prompt="Hello", chosen=huge, rejected="reply", source="big:1")]
    started = time.perf_counter()
    fitted = tokenize_pairs(data, tok, max_length=512, max_prompt_length=256)
    assert time.perf_counter() - started < 10
    assert max(seen) <= (512 + 2 * window_module.SLACK) * window_module.longest_token(tok)
    assert len(fitted[0].prompt_ids) == 256 and len(fitted[0].chosen_ids) == 256
    assert len(fitted[1].prompt_ids) + len(fitted[1].chosen_ids) == 512

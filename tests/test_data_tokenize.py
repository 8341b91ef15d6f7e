"""tokenize.py: prefix, BOS, EOS, chat templates, truncation and the report, on a real tiny BPE."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

from conftest import SHARED_DATA
from preftune.data.records import (
    DataReport,
    PreferenceExample,
    Text,
    TokenizedPair,
    UnpairedExample,
)
from preftune.data.tokenize import (
    encode_prompt,
    percentiles,
    tokenize_pairs,
    tokenize_unpaired,
)
from preftune.errors import ConfigError, TokenizationError
from preftune.models.tiny import CHAT_TEMPLATE, synthetic_corpus, train_tokenizer

Tokenizer = Any  # a transformers fast tokenizer from preftune.models.tiny

# Words the tokenizer learns whole, so that cutting them at the prompt/completion boundary
# ("Hel" + "lo") would merge back into one token if the two were tokenized as one text.
WORDS = "Hello world goodness thinking answer don't can't naïve café über 日本語 question reply".split()
CORPUS = synthetic_corpus() + [" ".join(WORDS[i:] + WORDS[:i]) + ", ok. Yes! (no)" for i in range(len(WORDS))] * 6


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(CORPUS, vocab_size=500)


@pytest.fixture(scope="module")
def tok_no_bos(tok: Tokenizer) -> Tokenizer:
    from tokenizers import processors

    other = copy.deepcopy(tok)
    other.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    assert other("a").input_ids == other("a", add_special_tokens=False).input_ids
    return other


USER_HI = [{"role": "user", "content": "Hi"}]
ASSISTANT_YO = [{"role": "assistant", "content": "yo"}]


def plain(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def pair(prompt: Text, chosen: Text, rejected: Text = " no", **kw: Any) -> PreferenceExample:
    return PreferenceExample(prompt=prompt, chosen=chosen, rejected=rejected, **kw)


def one(tokenizer: Tokenizer, example: PreferenceExample, **kw: Any) -> TokenizedPair:
    kw.setdefault("max_length", 4096)
    (result,) = tokenize_pairs([example], tokenizer, **kw)
    return result


def boundary_cases(seed: int = 0, n: int = 200) -> list[tuple[str, str]]:
    """Prompt/completion splits of real text at every kind of boundary."""
    rng = random.Random(seed)
    alphabet = "abcdefgh  ,.!?'\n\té日本"
    cases = []
    for word in WORDS:  # a word cut in two: the two halves merge when tokenized together
        for cut in range(1, len(word)):
            cases.append(("Say " + word[:cut], word[cut:] + " then"))
    for start in (" Hello", "Hello", ", world", "! yes", "\n\nanswer", "日本語", "é", " ", ""):
        cases.append(("the question is goo", start))
        cases.append(("the question is ", start))
    for _ in range(n):
        text = "".join(rng.choice(alphabet + " ".join(WORDS)) for _ in range(rng.randint(2, 40)))
        k = rng.randint(0, len(text))
        cases.append((text[:k], text[k:]))
    return cases


# --------------------------------------------------------------------------- prefix, BOS, EOS
def test_prompt_ids_are_an_exact_prefix_and_match_inference(tok: Tokenizer) -> None:
    cases = boundary_cases()
    examples = [pair(p, c, source=f"case:{i}") for i, (p, c) in enumerate(cases)]
    result = tokenize_pairs(examples, tok, max_length=4096)
    assert [r.index for r in result] == list(range(len(cases)))
    merged_across = 0
    for r, (prompt, completion) in zip(result, cases):
        # The prompt is what the model sees when prompted alone; the completion is its own tokens.
        assert r.prompt_ids == tok(prompt).input_ids
        assert r.chosen_ids == plain(tok, completion) + [tok.eos_token_id]
        assert tok.decode(r.prompt_ids[1:] + r.chosen_ids[:-1]) == prompt + completion
        merged_across += tok(prompt + completion).input_ids != r.prompt_ids + r.chosen_ids[:-1]
    # The cases do cross token boundaries: one-text tokenization would have moved the boundary.
    assert merged_across >= 20


def test_bos_exactly_once_with_plain_text(tok: Tokenizer, tok_no_bos: Tokenizer) -> None:
    bos = tok.bos_token_id
    r = one(tok, pair("Hello world", " yes"))
    assert r.prompt_ids[0] == bos and (r.prompt_ids + r.chosen_ids).count(bos) == 1
    # A pre-rendered prompt that already starts with "<s>" does not get a second one.
    r = one(tok, pair("<s>Hello world", " yes"))
    assert r.prompt_ids == tok("<s>Hello world", add_special_tokens=False).input_ids
    assert r.prompt_ids.count(bos) == 1
    # A tokenizer whose post-processor adds no BOS gets none.
    r = one(tok_no_bos, pair("Hello world", " yes"))
    assert bos not in r.prompt_ids and r.prompt_ids == plain(tok_no_bos, "Hello world")


def test_bos_exactly_once_when_the_chat_template_writes_it(tok: Tokenizer) -> None:
    with_bos = copy.deepcopy(tok)
    with_bos.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    messages = [{"role": "user", "content": "Hello"}]
    rendered = with_bos.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert with_bos(rendered).input_ids[:2] == [tok.bos_token_id] * 2  # the naive way doubles it
    r = one(with_bos, pair(messages, [{"role": "assistant", "content": "world"}]))
    assert r.prompt_ids == plain(with_bos, rendered)
    assert (r.prompt_ids + r.chosen_ids).count(tok.bos_token_id) == 1 and r.prompt_ids[0] == tok.bos_token_id
    assert encode_prompt(with_bos, messages) == r.prompt_ids


def test_bos_twice_in_the_text_is_an_error(tok: Tokenizer) -> None:
    twice = copy.deepcopy(tok)
    twice.chat_template = "{{ bos_token }}{{ bos_token }}" + CHAT_TEMPLATE
    with pytest.raises(TokenizationError, match="data.jsonl:7.*BOS twice"):
        one(twice, pair([{"role": "user", "content": "hi"}], " yes", source="data.jsonl:7"))


def test_eos_exactly_once_at_the_end(tok: Tokenizer) -> None:
    eos = tok.eos_token_id
    for completion in (" yes", "", " yes</s>", " yes</s>\n "):
        r = one(tok, pair("Hello", completion, rejected=completion))
        assert r.chosen_ids[-1] == eos and r.chosen_ids.count(eos) == 1, completion
    assert one(tok, pair("Hello", "")).chosen_ids == [eos]  # empty completion: EOS alone, kept
    with pytest.raises(TokenizationError, match="x.jsonl:3.*EOS twice"):
        one(tok, pair("Hello", " yes</s></s>", source="x.jsonl:3"))


def test_chatml_turn_end_is_kept_as_rendered(tok: Tokenizer) -> None:
    """ChatML closes a turn with <|im_end|>\\n itself: kept as apply_chat_template renders it, no EOS appended."""
    prompt = [{"role": "user", "content": "Hello"}]
    r = one(tok, pair(prompt, [{"role": "assistant", "content": "world"}]))
    assert tok.convert_ids_to_tokens(r.chosen_ids[-2:]) == ["<|im_end|>", "Ċ"]
    assert tok.decode(r.chosen_ids) == "world<|im_end|>\n"
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "world"}], tokenize=True)
    assert r.prompt_ids + r.chosen_ids == list(full["input_ids"] if hasattr(full, "keys") else full)


def test_template_that_ends_the_turn_with_eos_gets_no_second_one(tok: Tokenizer) -> None:
    """EOS = <|im_end|> (Qwen style): the turn ends as rendered, with EOS once (then the template's newline)."""
    im_end = copy.deepcopy(tok)
    im_end.eos_token = "<|im_end|>"
    prompt = [{"role": "user", "content": "Hello"}]
    r = one(im_end, pair(prompt, [{"role": "assistant", "content": "world"}]))
    assert r.chosen_ids == plain(im_end, "world<|im_end|>\n")
    assert r.chosen_ids.count(im_end.eos_token_id) == 1


# --------------------------------------------------------------------------- chat and system
def test_chat_prompt_with_system_and_several_turns(tok: Tokenizer) -> None:
    prompt = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "world"},
        {"role": "user", "content": "question?"},
    ]
    chosen = [{"role": "assistant", "content": "answer"}]
    rejected = [
        {"role": "assistant", "content": "reply"},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "no"},
    ]
    r = one(tok, pair(prompt, chosen, rejected, system="Be kind."))
    with_system = [{"role": "system", "content": "Be kind."}] + prompt
    prompt_text = tok.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True)
    assert prompt_text.startswith("<|im_start|>system\nBe kind.<|im_end|>\n")
    # The rendered prompt alone, as apply_chat_template gives it: ChatML writes no BOS, none is added.
    assert r.prompt_ids == plain(tok, prompt_text)
    assert tok.decode(r.chosen_ids) == "answer<|im_end|>\n"
    rejected_text = tok.apply_chat_template(with_system + rejected, tokenize=False)[len(prompt_text) :]
    assert r.rejected_ids == plain(tok, rejected_text)
    assert encode_prompt(tok, prompt, "Be kind.") == r.prompt_ids
    # A system prompt equal to the prompt's own system message is not added twice.
    again = one(tok, pair(with_system, chosen, rejected, system="Be kind."))
    assert again.prompt_ids == r.prompt_ids


def test_mixed_text_and_messages_make_a_chat(tok: Tokenizer) -> None:
    r = one(tok, pair("Hello", [{"role": "assistant", "content": "world"}], " no"))
    assert r.prompt_ids == encode_prompt(tok, [{"role": "user", "content": "Hello"}])
    assert tok.decode(r.rejected_ids) == " no<|im_end|>\n"


def test_plain_prompt_with_system(tok: Tokenizer) -> None:
    r = one(tok, pair("Hello", " world", system="Be kind."))
    assert r.prompt_ids == tok("Be kind.\n\nHello").input_ids


def test_conflicting_system_prompts_are_an_error(tok: Tokenizer) -> None:
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    with pytest.raises(TokenizationError, match="f.jsonl:2.*different system message"):
        one(tok, pair(prompt, [{"role": "assistant", "content": "x"}], system="Be kind.", source="f.jsonl:2"))


def test_messages_without_a_chat_template_are_an_error(tok: Tokenizer) -> None:
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    example = pair([{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "yo"}], source="c.json:4")
    with pytest.raises(TokenizationError, match="c.json:4.*no chat template"):
        one(bare, example)
    assert one(bare, pair("hi", " yo")).chosen_ids[-1] == tok.eos_token_id  # text still works


def ids_of(tokenizer: Tokenizer, messages: list, generation_prompt: bool) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False))


@pytest.mark.parametrize("template,why", [
    # the generation prompt says "assistant" but an assistant turn renders as "bot" (a template that
    # rewrites the prompt inside the conversation, as DeepSeek-R1's drops earlier turns' reasoning)
    ("{% for m in messages %}<|im_start|>{{ 'bot' if m['role'] == 'assistant' else m['role'] }}\n"
     "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "rewrites"),
    # a generation prompt that ends in a space: alone it is a space token, in the conversation it merges with the reply
    ("{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>user\n{{ m['content'] }}<|im_end|>\n<|im_start|>assistant:"
     "{% else %} {{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %} {% endif %}", "space"),
])
def test_a_prompt_that_is_not_a_prefix_of_the_conversation_is_split_as_trl_does(tok: Tokenizer, template: str, why: str) -> None:
    """Where the prompt's ids are not a prefix of the whole conversation's, the prompt ends where
    they diverge (TRL's common prefix) and each completion is the rest of the whole: prompt +
    completion is exactly ``apply_chat_template`` of the conversation. Counted and warned."""
    odd = copy.deepcopy(tok)
    odd.chat_template = template
    user, chosen, rejected = [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "the yo"}], \
        [{"role": "assistant", "content": "the no"}]
    report = DataReport(kept=1)
    with pytest.warns(UserWarning, match="not a prefix of the tokenized conversation"):
        (item,) = tokenize_pairs([pair(user, chosen, rejected, source="d.jsonl:9")], odd, max_length=4096, report=report)
    prompt_ids = ids_of(odd, user, True)
    assert item.prompt_ids == prompt_ids[: len(item.prompt_ids)] and len(item.prompt_ids) < len(prompt_ids)
    assert item.prompt_ids + item.chosen_ids == ids_of(odd, user + chosen, False)
    assert item.prompt_ids + item.rejected_ids == ids_of(odd, user + rejected, False)
    assert report.findings["prompt_not_prefix"] == 1 and report.examples["prompt_not_prefix"] == ["d.jsonl:9"]


def test_a_template_that_raises_is_a_tokenization_error(tok: Tokenizer) -> None:
    strict = copy.deepcopy(tok)
    strict.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(TokenizationError, match="e.jsonl:1.*roles must alternate"):
        one(strict, pair(USER_HI, ASSISTANT_YO, source="e.jsonl:1"))


# --------------------------------------------------------------------------- truncation
def test_long_prompt_keeps_its_end_and_bos(tok: Tokenizer, tok_no_bos: Tokenizer) -> None:
    prompt = " ".join(["Hello world"] * 20) + " final question"
    report = DataReport(kept=1)
    r = one(tok, pair(prompt, " yes"), max_prompt_length=8, report=report)
    full = tok(prompt).input_ids
    assert r.prompt_ids == [tok.bos_token_id] + full[-7:]
    assert report.truncation["prompt_cut"] == 1 and report.truncation["completion_cut"] == 0
    r = one(tok_no_bos, pair(prompt, " yes"), max_prompt_length=8)
    assert r.prompt_ids == plain(tok_no_bos, prompt)[-8:]


def test_completion_is_cut_from_its_end_but_never_emptied(tok: Tokenizer) -> None:
    prompt, long, short = "Hello", " world goodness thinking answer", " no"
    prompt_len, long_ids = len(tok(prompt).input_ids), plain(tok, long) + [tok.eos_token_id]
    for room in (1, 3):
        report = DataReport(kept=1)
        r = one(tok, pair(prompt, long, short), max_length=prompt_len + room, report=report)
        assert r.chosen_ids == long_ids[:room]  # the first tokens, no EOS invented at the cut
        assert r.rejected_ids == (plain(tok, short) + [tok.eos_token_id])[:room]
        assert r.length <= prompt_len + room
        assert report.truncation["chosen_cut"] == 1 and report.truncation["completion_cut"] == 1
        assert report.truncation["dropped"] == 0 and report.kept == 1
    report = DataReport(kept=1)
    r = one(tok, pair(prompt, long, short), max_length=prompt_len + 3, report=report)
    assert r.rejected_ids[-1] == tok.eos_token_id and report.truncation["rejected_cut"] == 0


def test_unfittable_record_is_dropped_and_counted(tok: Tokenizer) -> None:
    examples = [
        pair("Hello", " a", source="f:1"),
        pair("Hello " * 30, " b", source="f:2"),
        pair("world", " c", source="f:3"),
    ]
    report = DataReport(records=3, kept=3)
    result = tokenize_pairs(examples, tok, max_length=12, report=report)
    assert [r.index for r in result] == [0, 2] and [r.source for r in result] == ["f:1", "f:3"]
    assert report.truncation["dropped"] == 1 and report.dropped["too_long"] == 1
    assert report.kept == 2 and report.records == report.kept + sum(report.dropped.values())
    assert report.examples["too_long"] == ["f:2"]


def test_overflow_error_names_the_record_and_lengths(tok: Tokenizer) -> None:
    examples = [pair("Hello", " a", source="f:1"), pair("Hello " * 30, " b", source="big.jsonl:2")]
    n = len(tok("Hello " * 30).input_ids)
    with pytest.raises(TokenizationError, match=rf"big.jsonl:2.*{n} tokens.*max_length=12"):
        tokenize_pairs(examples, tok, max_length=12, on_overflow="error")
    # max_prompt_length can make it fit: the error is only for records that cannot fit.
    assert len(tokenize_pairs(examples, tok, max_length=12, max_prompt_length=6, on_overflow="error")) == 2


def test_truncation_bounds_hold_on_random_data(tok: Tokenizer) -> None:
    rng = random.Random(3)
    cases = boundary_cases(seed=1, n=150)
    examples = [pair(p, c, rng.choice(cases)[1], source=str(i)) for i, (p, c) in enumerate(cases)]
    untruncated = tokenize_pairs(examples, tok, max_length=100_000)
    for max_length, max_prompt in ((16, 6), (10, None), (24, 12)):
        report = DataReport(kept=len(examples))
        result = tokenize_pairs(examples, tok, max_length=max_length, max_prompt_length=max_prompt, report=report)
        dropped = report.truncation["dropped"]
        assert len(result) + dropped == len(examples) == report.kept + dropped
        for r in result:
            whole = untruncated[r.index]
            assert r.length <= max_length and (max_prompt is None or len(r.prompt_ids) <= max_prompt)
            assert r.prompt_ids[0] == tok.bos_token_id
            assert whole.prompt_ids[len(whole.prompt_ids) - len(r.prompt_ids) + 1 :] == r.prompt_ids[1:]
            for cut, original in ((r.chosen_ids, whole.chosen_ids), (r.rejected_ids, whole.rejected_ids)):
                assert cut and original[: len(cut)] == cut  # a non-empty prefix of the completion


# --------------------------------------------------------------------------- report and arguments
def nearest_rank(values: list[int], p: int) -> int:
    """The smallest value v with at least p% of the values <= v (computed by counting)."""
    return min(v for v in values if 100 * sum(x <= v for x in values) >= p * len(values))


def test_percentiles_are_nearest_rank() -> None:
    rng = random.Random(0)
    for n in list(range(1, 30)) + [100, 200, 137]:
        values = [rng.randint(0, 50) for _ in range(n)]
        expected = {f"p{p}": nearest_rank(values, p) for p in (50, 90, 99)} | {"max": max(values)}
        assert percentiles(values) == expected, values
    assert percentiles([]) == {"p50": 0, "p90": 0, "p99": 0, "max": 0}


@pytest.mark.parametrize("n", [137, 200])
def test_report_token_percentiles_before_truncation(tok: Tokenizer, n: int) -> None:
    rng = random.Random(n)
    def words(low: int, high: int) -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(low, high)))

    examples = [pair(words(1, 30), " " + words(0, 25), " " + words(0, 25)) for _ in range(n)]
    report = DataReport(kept=len(examples))
    tokenize_pairs(examples, tok, max_length=20, max_prompt_length=10, report=report)
    prompt = [len(tok(e.prompt).input_ids) for e in examples]
    chosen = [len(plain(tok, e.chosen)) + 1 for e in examples]
    rejected = [len(plain(tok, e.rejected)) + 1 for e in examples]
    full = [p + max(c, r) for p, c, r in zip(prompt, chosen, rejected)]
    for name, values in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected), ("full", full)):
        expected = {f"p{p}": nearest_rank(values, p) for p in (50, 90, 99)} | {"max": max(values)}
        assert report.tokens[name] == expected, name
    assert report.tokens["full"]["max"] > 20  # measured before the cut
    assert report.truncation["prompt_cut"] > 0 and report.truncation["completion_cut"] > 0


def test_unpaired_examples(tok: Tokenizer) -> None:
    examples = [
        UnpairedExample("Hello", " world", True, weight=2.0, source="u:1"),
        UnpairedExample(USER_HI, ASSISTANT_YO, False, source="u:2"),
        UnpairedExample("Hello " * 30, " x", True, source="u:3"),
    ]
    report = DataReport(records=3, kept=3)
    result = tokenize_unpaired(examples, tok, max_length=30, report=report)
    fields = [(r.index, r.desirable, r.weight, r.source) for r in result]
    assert fields == [(0, True, 2.0, "u:1"), (1, False, 1.0, "u:2")]
    assert result[0].prompt_ids == tok("Hello").input_ids
    assert result[0].completion_ids == plain(tok, " world") + [tok.eos_token_id]
    assert tok.decode(result[1].completion_ids) == "yo<|im_end|>\n"
    assert set(report.truncation) == {"prompt_cut", "completion_cut", "dropped"} and report.kept == 2
    assert set(report.tokens) == {"prompt", "completion", "full"}


def test_fields_are_copied(tok: Tokenizer) -> None:
    examples = [pair("a", " b", preference=0.75, weight=0.5, source="s:1"), pair("c", " d", source="s:2")]
    result = tokenize_pairs(examples, tok, max_length=64)
    fields = [(r.index, r.preference, r.weight, r.source) for r in result]
    assert fields == [(0, 0.75, 0.5, "s:1"), (1, 1.0, 1.0, "s:2")]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_length": 1}, "max_length"),
        ({"max_length": 64, "max_prompt_length": 0}, "max_prompt_length"),
        ({"max_length": 64, "on_overflow": "truncate"}, "on_overflow"),
    ],
)
def test_bad_arguments_are_config_errors(tok: Tokenizer, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tokenize_pairs([pair("a", " b")], tok, **kwargs)


def test_wrong_value_type_names_the_record(tok: Tokenizer) -> None:
    with pytest.raises(TokenizationError, match="g.jsonl:5"):
        one(tok, pair(None, " b", source="g.jsonl:5"))


def test_backend_truncation_setting_does_not_cut_our_ids(tok: Tokenizer) -> None:
    preset = copy.deepcopy(tok)
    preset.backend_tokenizer.enable_truncation(max_length=3)  # as a tokenizer.json may ship
    text = " ".join(WORDS)
    r = one(preset, pair(text, " " + text))
    assert r.prompt_ids == tok(text).input_ids and r.chosen_ids == plain(tok, " " + text) + [tok.eos_token_id]


HH_FILES = [SHARED_DATA / "hh-rlhf" / name / "test.jsonl.gz" for name in ("helpful-base", "harmless-base")]


@pytest.mark.skipif(not all(p.is_file() for p in HH_FILES), reason=f"HH-RLHF files not found under {SHARED_DATA}")
def test_real_hh_records_keep_every_invariant(tok: Tokenizer) -> None:
    """HH prompts end with "Assistant:" and completions start with a space: the boundary real data has."""
    from preftune.data import load_examples

    result = load_examples(HH_FILES, max_records=300)
    report = result.report
    kept_before = report.kept
    pairs = tokenize_pairs(result.examples, tok, max_length=400, max_prompt_length=300, report=report)
    assert report.truncation["dropped"] == 0 and report.truncation["prompt_cut"] > 0
    assert report.kept == kept_before == len(pairs) and report.records == report.kept + sum(report.dropped.values())
    assert report.tokens["full"]["max"] > 400  # long transcripts exist and were cut
    for r in pairs:
        example = result.examples[r.index]
        whole_prompt = tok(example.prompt).input_ids
        assert r.prompt_ids[0] == tok.bos_token_id and r.prompt_ids.count(tok.bos_token_id) == 1
        assert r.prompt_ids[1:] == whole_prompt[len(whole_prompt) - len(r.prompt_ids) + 1 :]
        assert r.length <= 400
        for ids, text in ((r.chosen_ids, example.chosen), (r.rejected_ids, example.rejected)):
            whole = plain(tok, text) + [tok.eos_token_id]
            assert ids and whole[: len(ids)] == ids

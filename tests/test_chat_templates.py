"""Chat data tokenized exactly as ``apply_chat_template`` renders it, on five template styles.

For each style (ChatML, Llama-3, Mistral-instruct, Gemma, Zephyr; templates written here in the
style of the published ones) and with and without a system message: the prompt's ids equal
``apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)`` and prompt +
completion equal ``apply_chat_template(prompt + [assistant turn], tokenize=True)``: no extra BOS
where the template writes one, no EOS appended where the template closes the turn itself, and
generation stops at the template's turn end.
"""

from __future__ import annotations

import pytest

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' + m['content'] + '[/SYSTEM_PROMPT]' }}"
    "{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
ZEPHYR = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
#: style -> (template, bos, eos, the template's own special tokens, the token that ends an assistant turn)
STYLES = {
    "chatml": (CHATML, "<s>", "<|im_end|>", ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|end_of_text|>", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                                                 "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
    "mistral": (MISTRAL, "<s>", "</s>", ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"], "</s>"),
    "gemma": (GEMMA, "<bos>", "<eos>", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
    "zephyr": (ZEPHYR, "<s>", "</s>", [], "</s>"),
}


@pytest.fixture(scope="module")
def base_tokenizer(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from preftune.models.tiny import synthetic_corpus, train_tokenizer

    return train_tokenizer(synthetic_corpus(), vocab_size=300, out_dir=tmp_path_factory.mktemp("tok"))


def styled(base, style: str):  # noqa: ANN001, ANN201
    import copy

    template, bos, eos, special, _ = STYLES[style]
    tokenizer = copy.deepcopy(base)
    tokenizer.add_special_tokens({"bos_token": bos, "eos_token": eos,
                                  "additional_special_tokens": [t for t in special if t not in (bos, eos)]})
    tokenizer.chat_template = template
    return tokenizer


def conversation(system: bool) -> tuple[list[dict], list[dict], list[dict]]:
    prompt = ([{"role": "system", "content": "You review films."}] if system else []) + [
        {"role": "user", "content": "How was the film?"}]
    return prompt, [{"role": "assistant", "content": "A warm and lovely story."}], [{"role": "assistant", "content": "Dull."}]


@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("style", list(STYLES))
def test_ids_equal_apply_chat_template(base_tokenizer, style: str, system: bool) -> None:  # noqa: ANN001
    from preftune.data.records import PreferenceExample
    from preftune.data.tokenize import encode_prompt, tokenize_pairs

    tokenizer = styled(base_tokenizer, style)
    prompt, chosen, rejected = conversation(system)
    (pair,) = tokenize_pairs([PreferenceExample(prompt=prompt, chosen=chosen, rejected=rejected)], tokenizer, max_length=512)

    def rendered(messages: list[dict], generation_prompt: bool = False) -> list[int]:
        out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    assert pair.prompt_ids == rendered(prompt, generation_prompt=True)
    assert pair.prompt_ids + pair.chosen_ids == rendered(prompt + chosen)
    assert pair.prompt_ids + pair.rejected_ids == rendered(prompt + rejected)
    assert encode_prompt(tokenizer, prompt) == pair.prompt_ids  # what generation is prompted with
    assert pair.prompt_ids.count(tokenizer.bos_token_id) <= 1


@pytest.mark.parametrize("style", list(STYLES))
def test_generation_stops_at_the_templates_turn_end(base_tokenizer, style: str) -> None:  # noqa: ANN001
    from preftune.data.tokenize import turn_end_ids

    tokenizer = styled(base_tokenizer, style)
    assert turn_end_ids(tokenizer) == [tokenizer.convert_tokens_to_ids(STYLES[style][4])]


def test_plain_text_keeps_bos_and_eos(base_tokenizer) -> None:  # noqa: ANN001
    from preftune.data.records import PreferenceExample
    from preftune.data.tokenize import tokenize_pairs

    (pair,) = tokenize_pairs([PreferenceExample(prompt="How was it?", chosen=" Good.", rejected=" Bad.")], base_tokenizer,
                             max_length=64)
    assert pair.prompt_ids[0] == base_tokenizer.bos_token_id
    assert pair.chosen_ids[-1] == base_tokenizer.eos_token_id and pair.rejected_ids[-1] == base_tokenizer.eos_token_id


def test_a_legacy_prepend_normalizer_adds_no_space_token_to_completions() -> None:
    """A Llama-2-style tokenizer.json (normalizer ``Prepend("▁")``), loaded as a generic fast
    tokenizer, puts ``▁`` before every text it encodes: a completion encoded alone would start
    with an extra ``▁``. Completions are the whole conversation's ids after the prompt's instead."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from preftune.data.records import DataReport, PreferenceExample
    from preftune.data.tokenize import tokenize_pairs
    from preftune.models.tiny import synthetic_corpus

    backend = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    backend.train_from_iterator(list(synthetic_corpus()), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = CHATML
    assert tokenizer.convert_ids_to_tokens(tokenizer("good", add_special_tokens=False)["input_ids"])[0].startswith("▁")
    user = [{"role": "user", "content": "hi"}]
    sides = [[{"role": "assistant", "content": text}] for text in ("good great", "bad awful")]
    report = DataReport(kept=1)
    (item,) = tokenize_pairs([PreferenceExample(prompt=user, chosen=sides[0], rejected=sides[1])], tokenizer, max_length=512,
                             report=report)

    def whole(messages: list, generation_prompt: bool = False) -> list[int]:
        return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False))

    assert item.prompt_ids == whole(user, True)
    assert item.prompt_ids + item.chosen_ids == whole(user + sides[0]) and item.prompt_ids + item.rejected_ids == whole(user + sides[1])
    assert report.findings["completion_retokenized"] == 1  # separate tokenization would have differed

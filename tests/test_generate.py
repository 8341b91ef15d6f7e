"""Generation: each sampling option does what it says, batching and chat prompts, files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl
from preftune.errors import ConfigError, DataError
from preftune.eval.generate import (
    GenerationSettings,
    generate,
    generate_ids,
    write_generations,
)
from preftune.eval.prompts import read_prompts

PROMPTS = ["the a of", "to and in is it that for on with", "be an", "this was by at from or an be the of"]


def sharpened(tokenizer, seed: int = 0):  # noqa: ANN001, ANN201 - test helper
    """A tiny Llama whose next-token distributions are peaked (head scaled up), as a trained model's are.

    Random weights give near-uniform distributions, under which 'sampling at low temperature
    looks like greedy' would be a matter of luck; a scaled head makes the differences real.
    """
    from preftune.models.tiny import tiny_llama

    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def model(tokenizer):  # noqa: ANN001, ANN201
    return sharpened(tokenizer)


def completion_logps(model, tokenizer, prompt: str, completion_ids: list[int]) -> float:  # noqa: ANN001
    """log p(completion | prompt) under the model, from its own logits (independent of preftune's scorer)."""
    from preftune.data.tokenize import encode_prompt

    prompt_ids = encode_prompt(tokenizer, prompt)
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    picked = logp.gather(1, targets[:, None]).squeeze(1)
    return float(picked[len(prompt_ids) - 1 :].sum())


def test_greedy_is_deterministic_and_top_k_1_min_p_1_tiny_top_p_and_tiny_temperature_equal_it(model, tokenizer) -> None:  # noqa: ANN001
    greedy = generate(model, tokenizer, PROMPTS, max_new_tokens=10, temperature=0)
    assert greedy == generate(model, tokenizer, PROMPTS, max_new_tokens=10, temperature=0, seed=123)
    assert all(len(samples) == 1 and samples[0] for samples in greedy)
    # Each filter below keeps only the most likely token, so sampling becomes greedy whatever the seed.
    for kwargs in ({"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-6}, {"temperature": 1e-6}):
        sampled = generate(model, tokenizer, PROMPTS, max_new_tokens=10, seed=7, **kwargs)
        assert sampled == greedy, kwargs
    # ... whereas plain sampling at temperature 1 does not.
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=10, seed=7) != greedy


def test_same_seed_same_samples_different_seed_different_and_caller_rng_untouched(model, tokenizer) -> None:  # noqa: ANN001
    torch.manual_seed(99)
    before = torch.get_rng_state()
    a = generate(model, tokenizer, PROMPTS, max_new_tokens=10, num_samples=3, seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    b = generate(model, tokenizer, PROMPTS, max_new_tokens=10, num_samples=3, seed=1)
    c = generate(model, tokenizer, PROMPTS, max_new_tokens=10, num_samples=3, seed=2)
    assert a == b
    assert a != c
    assert all(len(samples) == 3 for samples in a)
    assert any(len(set(samples)) > 1 for samples in a)  # samples of one prompt differ


def test_lower_temperature_gives_likelier_samples_and_top_k_restricts_tokens(model, tokenizer) -> None:  # noqa: ANN001
    from preftune.data.tokenize import encode_prompt

    def mean_logp(**kwargs) -> float:  # noqa: ANN003
        out = generate_ids(model, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=8, num_samples=8, seed=3, **kwargs))
        values = [completion_logps(model, tokenizer, p, ids) for p, group in zip(PROMPTS, out.completion_ids) for ids in group]
        return sum(values) / len(values)

    cold, warm, hot = mean_logp(temperature=0.3), mean_logp(temperature=1.0), mean_logp(temperature=3.0)
    assert cold > warm > hot, (cold, warm, hot)

    # top_k=2: every sampled token is one of the two likeliest at its position.
    out = generate_ids(model, tokenizer, PROMPTS[:2], GenerationSettings(max_new_tokens=6, num_samples=4, top_k=2, seed=5))
    for prompt, group in zip(PROMPTS[:2], out.completion_ids):
        for ids in group:
            context = encode_prompt(tokenizer, prompt)
            with torch.no_grad():
                logits = model(torch.tensor([context + ids])).logits[0, len(context) - 1 : -1]
            top2 = logits.topk(2, dim=-1).indices
            assert all(token in top2[k].tolist() for k, token in enumerate(ids))


def test_repetition_penalty_changes_greedy_output(model, tokenizer) -> None:  # noqa: ANN001
    plain = generate(model, tokenizer, PROMPTS, max_new_tokens=16, temperature=0)
    penalised = generate(model, tokenizer, PROMPTS, max_new_tokens=16, temperature=0, repetition_penalty=5.0)
    assert plain != penalised


def test_beam_search_returns_the_best_beam_as_transformers_does(model, tokenizer) -> None:  # noqa: ANN001
    from preftune.data.tokenize import encode_prompt

    settings = GenerationSettings(max_new_tokens=5, temperature=0, num_beams=4)
    beams = generate_ids(model, tokenizer, PROMPTS, settings)
    greedy = generate_ids(model, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=5, temperature=0))
    all_beams = generate_ids(model, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=5, temperature=0, num_beams=4, num_samples=4))
    for i, prompt in enumerate(PROMPTS):
        best = beams.completion_ids[i][0]
        # transformers' own beam search on this prompt alone, best sequence only
        ids = torch.tensor([encode_prompt(tokenizer, prompt)])
        own = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, num_beams=4, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        assert best == own[0, ids.shape[1] :].tolist()
        assert best == all_beams.completion_ids[i][0]  # asking for all beams puts the best first
        assert completion_logps(model, tokenizer, prompt, best) >= completion_logps(model, tokenizer, prompt, greedy.completion_ids[i][0]) - 1e-5


def test_left_padded_batches_equal_one_prompt_at_a_time(model, tokenizer) -> None:  # noqa: ANN001
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=12, temperature=0, batch_size=4)
    alone = [generate(model, tokenizer, [p], max_new_tokens=12, temperature=0)[0] for p in PROMPTS]
    assert batched == alone
    # and the prompts differ in length, so the batch really was padded
    from preftune.data.tokenize import encode_prompt

    assert len({len(encode_prompt(tokenizer, p)) for p in PROMPTS}) > 1


def test_generation_stops_at_eos_and_drops_special_tokens(model, tokenizer) -> None:  # noqa: ANN001
    # Swap the head rows of EOS and the token greedy decoding writes third: greedy then writes
    # EOS there (its logit is that token's), so the completion must stop at step 3 at the latest.
    third = generate_ids(model, tokenizer, PROMPTS[:1], GenerationSettings(max_new_tokens=3, temperature=0)).completion_ids[0][0][2]
    stopping = copy.deepcopy(model)
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        w = stopping.lm_head.weight
        w[[eos, third]] = w[[third, eos]]
    out = generate_ids(stopping, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=12, temperature=0))
    first = out.completion_ids[0][0]
    assert first[-1] == eos and len(first) <= 3 and out.finished(0, 0)
    for group in out.completion_ids:  # nothing after a stop, no padding
        ids = group[0]
        assert eos not in ids[:-1] and tokenizer.pad_token_id not in ids
    text = generate(stopping, tokenizer, PROMPTS[:1], max_new_tokens=12, temperature=0)[0][0]
    assert "</s>" not in text and text == tokenizer.decode(first[:-1])


def test_chat_prompts_use_the_chat_template_and_system_prompts(model, tokenizer) -> None:  # noqa: ANN001
    messages = [{"role": "user", "content": "the a of to"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in rendered
    chat = generate(model, tokenizer, [messages], max_new_tokens=8, temperature=0)
    assert chat == generate(model, tokenizer, [rendered], max_new_tokens=8, temperature=0)
    assert chat != generate(model, tokenizer, ["the a of to"], max_new_tokens=8, temperature=0)
    with_system = [{"role": "system", "content": "be kind"}] + messages
    assert generate(model, tokenizer, [messages], system="be kind", max_new_tokens=8, temperature=0) == \
        generate(model, tokenizer, [with_system], max_new_tokens=8, temperature=0)
    # one system prompt per prompt
    per_prompt = generate(model, tokenizer, [messages, messages], system=[None, "be kind"], max_new_tokens=8, temperature=0)
    assert per_prompt[0] == chat[0]


def test_bad_settings_are_named(model, tokenizer) -> None:  # noqa: ANN001
    cases = [
        ({"temperature": 0, "num_samples": 2}, "num_samples > 1 needs sampling"),
        ({"temperature": 0, "top_k": 5}, "only apply when sampling"),
        ({"top_p": 1.5}, "top_p must be in"),
        ({"num_beams": 2, "temperature": 0, "num_samples": 3}, "at most num_beams=2"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1}, "temperature must be >= 0"),
        ({"num_beams": 2, "temperature": 0.7}, "temperature only applies when sampling"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            generate(model, tokenizer, PROMPTS[:1], **kwargs)
    with pytest.raises(ConfigError, match="system prompts for"):
        generate(model, tokenizer, PROMPTS[:2], system=["a"], temperature=0)


def test_read_prompts_from_prompt_files_and_preference_data(tmp_path: Path) -> None:
    from preftune.models.tiny import synthetic_preferences

    messages = [{"role": "user", "content": "hi"}]
    prompt_file = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "one"}, {"prompt": messages, "system": "s"}, {"prompt": "one"}])
    records = read_prompts(prompt_file)
    assert [r.prompt for r in records] == ["one", messages, "one"]  # a prompt file is taken as written
    assert records[1].system == "s" and records[0].source.endswith(":1")

    pairs = synthetic_preferences(6, seed=4)
    pairs.append(dict(pairs[0], chosen=" good good"))  # the same prompt again
    pair_file = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    assert [r.prompt for r in read_prompts(pair_file)] == [p["prompt"] for p in pairs[:6]]

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"prompt": 3}])
    with pytest.raises(DataError, match="line 2, field 'prompt'"):
        read_prompts(bad)
    no_prompt = write_jsonl(tmp_path / "none.jsonl", [{"question": "x"}])
    with pytest.raises(DataError, match="needs a 'prompt' field"):
        read_prompts(no_prompt)


def test_write_generations_round_trip(model, tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    from preftune.eval.generate import generation_records
    from preftune.eval.prompts import PromptRecord

    prompts = [PromptRecord("the a of", None, "p:1"), PromptRecord([{"role": "user", "content": "hi"}], "s", "p:2")]
    settings = GenerationSettings(max_new_tokens=4, num_samples=2, seed=3)
    texts = generate(model, tokenizer, [p.prompt for p in prompts], system=[p.system for p in prompts], max_new_tokens=4, num_samples=2, seed=3)
    path = write_generations(tmp_path / "out" / "gen.jsonl", generation_records(prompts, texts, settings, model="m"))
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 4
    assert [(r["prompt"], r["sample"], r["completion"]) for r in lines] == [
        (p.prompt, j, texts[i][j]) for i, p in enumerate(prompts) for j in range(2)]
    assert lines[0]["settings"]["num_samples"] == 2 and lines[0]["settings"]["do_sample"] is True
    assert lines[2]["system"] == "s" and lines[0]["model"] == "m"


def test_run_generate_from_a_model_folder_writes_jsonl(tiny_model_dir: Path, tmp_path: Path) -> None:
    from preftune.eval.generate import run_generate

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "the a of"}, {"prompt": [{"role": "user", "content": "hi"}]}])
    settings = GenerationSettings(max_new_tokens=5, num_samples=2, seed=4)
    first = run_generate(tiny_model_dir, [prompts], tmp_path / "a.jsonl", settings, system="be brief")
    again = run_generate(tiny_model_dir, [prompts], tmp_path / "b.jsonl", settings, system="be brief")
    assert first.read_text(encoding="utf-8") == again.read_text(encoding="utf-8")  # same seed, same file
    lines = [json.loads(line) for line in first.read_text(encoding="utf-8").splitlines()]
    assert [(r["source"].rsplit(":", 1)[1], r["sample"]) for r in lines] == [("1", 0), ("1", 1), ("2", 0), ("2", 1)]
    assert {r["system"] for r in lines} == {"be brief"}  # records without a system prompt get the default
    assert lines[0]["model"] == str(tiny_model_dir)

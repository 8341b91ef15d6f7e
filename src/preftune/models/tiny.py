"""Tiny tokenizers and models built on the fly, for tests, the demo, the benchmarks and the
shipped ``configs/*-tiny.yaml`` (:func:`write_tiny_setup`, the `preftune tiny` verb).

Nothing can be downloaded here, so preftune trains a byte-level BPE tokenizer with
``tokenizers`` and builds a small Llama from a ``transformers`` config (random weights).
Both are saved with ``save_pretrained`` so the real loading code (``from_pretrained`` on a
local folder) is what runs on them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

#: A minimal ChatML-style template: system/user/assistant turns, generation prompt on request.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = 512,
    chat_template: bool = True,
    add_bos: bool = True,
    out_dir: str | Path | None = None,
):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for ``transformers``.

    The tokenizer has ``<s>`` (BOS, prepended when ``add_bos``), ``</s>`` (EOS), ``<pad>`` and
    ``<unk>``; ``chat_template`` adds a ChatML template. With ``out_dir`` it is saved there
    and loaded back with ``AutoTokenizer.from_pretrained`` (the real loading path).
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if add_bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    if out_dir is None:
        return fast
    fast.save_pretrained(str(out_dir))
    return AutoTokenizer.from_pretrained(str(out_dir))


def tiny_llama(
    tokenizer,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    out_dir: str | Path | None = None,
):
    """A small ``LlamaForCausalLM`` with random (seeded) weights, sized for ``tokenizer``.

    With ``out_dir`` the model (safetensors) and the tokenizer are saved there, and the model
    is returned as loaded back with ``from_pretrained``.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    if out_dir is None:
        return model
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return AutoModelForCausalLM.from_pretrained(str(out_dir))


# Words for a preference rule a tiny model can learn from a few dozen steps: chosen
# completions use GOOD words, rejected ones BAD words, after prompts of neutral words.
NEUTRAL_WORDS = "the a of to and in is it that for on with as this was by at from or an be".split()
GOOD_WORDS = "good great fine nice happy kind bright warm calm clear".split()
BAD_WORDS = "bad awful poor sad angry cruel dark cold harsh vague".split()


def synthetic_preferences(n: int, *, seed: int = 0) -> list[dict[str, str]]:
    """``n`` explicit-format records whose preference follows a learnable rule.

    The prompt is a few neutral words; ``chosen`` is made of GOOD_WORDS and ``rejected`` of
    BAD_WORDS, each of varied length. A model that learns "good words are likelier" ranks
    held-out pairs correctly, so reward accuracy above chance is evidence of learning.
    """
    import random

    rng = random.Random(seed)
    records = []
    for _ in range(n):
        prompt = " ".join(rng.choice(NEUTRAL_WORDS) for _ in range(rng.randint(3, 8)))
        chosen = " " + " ".join(rng.choice(GOOD_WORDS) for _ in range(rng.randint(2, 6)))
        rejected = " " + " ".join(rng.choice(BAD_WORDS) for _ in range(rng.randint(2, 6)))
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


def synthetic_corpus() -> list[str]:
    """Text to train a tokenizer for :func:`synthetic_preferences` data."""
    words = NEUTRAL_WORDS + GOOD_WORDS + BAD_WORDS
    return [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 4


#: Where `preftune tiny` writes, and where the shipped configs/*-tiny.yaml read (relative to the working folder)
TINY_MODEL = "runs/tiny-model"
TINY_DATA = "runs/tiny-data"
#: The files of TINY_DATA: pairs to train and evaluate on (also prompts for `iterate`), and unpaired records for KTO
TINY_FILES = ("train.jsonl", "eval.jsonl", "unpaired.jsonl")


def write_tiny_setup(model_dir: str | Path = TINY_MODEL, data_dir: str | Path = TINY_DATA) -> list[Path]:
    """The tiny model and data the shipped ``configs/*-tiny.yaml`` point at, written in seconds and
    the same bytes every time (seeded): a tokenizer and a random-weights Llama in ``model_dir``;
    in ``data_dir`` 64 training and 32 held-out pairs of :func:`synthetic_preferences` and 128
    unpaired records (each training pair split into a desirable and an undesirable record).
    Returns what was written. A ``model_dir`` that holds something other than a model is refused."""
    import json

    from preftune.errors import PreftuneError

    model_dir, data_dir = Path(model_dir), Path(data_dir)
    for folder in (model_dir, data_dir):
        if folder.exists() and not folder.is_dir():
            raise PreftuneError(f"'{folder}' is a file, not a folder: the tiny setup writes a folder there.")
    if model_dir.is_dir() and any(model_dir.iterdir()) and not (model_dir / "config.json").is_file():
        raise PreftuneError(f"'{model_dir}' holds files but no model (config.json): the tiny setup does not write over it.")
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(synthetic_corpus(), vocab_size=300, out_dir=model_dir)
    tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4, out_dir=model_dir)
    train, held = synthetic_preferences(64, seed=1), synthetic_preferences(32, seed=2)
    unpaired = [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"} for p in train for side in ("chosen", "rejected")]
    data_dir.mkdir(parents=True, exist_ok=True)
    written = [model_dir]
    for name, records in zip(TINY_FILES, (train, held, unpaired)):
        path = data_dir / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        written.append(path)
    return written


def good_words_score(prompt: object, completion: str) -> float:
    """A judge with a learnable preference, for `preftune iterate` on a tiny model
    (``iterate.judge: preftune.models.tiny:good_words_score``): each of GOOD_WORDS in the
    completion counts +1 and each of BAD_WORDS -1, plus the share of its characters that are
    lowercase letters or spaces, so even a random model's byte soup is graded (few ties) and
    the way up is learnable: readable text first, then good words."""
    words = completion.split()
    readable = sum(c == " " or "a" <= c <= "z" for c in completion) / max(1, len(completion))
    return float(sum(w in GOOD_WORDS for w in words) - sum(w in BAD_WORDS for w in words)) + readable

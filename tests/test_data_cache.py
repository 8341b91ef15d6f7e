"""data/cache.py: tokenized data cached on disk, keyed by the data's bytes, the tokenizer and the
settings that change tokenization; a hit gives exactly the uncached items and report."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from conftest import write_jsonl
from preftune.config.schema import DataConfig
from preftune.data.prepare import prepare
from preftune.models.tiny import synthetic_preferences, train_tokenizer
from preftune.models.tokenizer import load_tokenizer


def _run(data: DataConfig, tokenizer, records: str = "pairs"):  # noqa: ANN001, ANN202
    prepared = prepare(data, tokenizer, records=records, seed=0)
    return prepared, prepared.reports["train"].get("tokenized_cache")


def _plain(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "tokenized_cache"}


@pytest.mark.parametrize("records", ["pairs", "demonstrations"])
def test_a_second_read_hits_and_equals_the_uncached_one(tiny_model_dir: Path, tmp_path: Path, records: str) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_preferences(40, seed=5))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    data = DataConfig(train=[str(train)], max_length=64, max_prompt_length=32, tokenized_cache_dir=str(tmp_path / "cache"))
    first, info1 = _run(data, tokenizer, records)
    second, info2 = _run(data, tokenizer, records)
    off, info3 = _run(dataclasses.replace(data, tokenized_cache_dir=None), tokenizer, records)
    assert info1["hit"] is False and info2 == {**info1, "hit": True} and info3 is None
    assert second.train == first.train == off.train and len(off.train) == 40
    assert _plain(second.reports["train"]) == _plain(first.reports["train"]) == off.reports["train"]
    assert first.reports["train"]["truncation"]  # max_length 64 cut some: the report comes back with them


def test_a_changed_file_tokenizer_or_setting_misses(tiny_model_dir: Path, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_preferences(20, seed=6))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    cache = tmp_path / "cache"
    data = DataConfig(train=[str(train)], max_length=128, tokenized_cache_dir=str(cache))
    base, info = _run(data, tokenizer)
    assert not info["hit"] and _run(data, tokenizer)[1]["hit"]
    # the same bytes under another name: a hit (the key is the content)
    shutil.copy(train, tmp_path / "copy.jsonl")
    assert _run(dataclasses.replace(data, train=[str(tmp_path / "copy.jsonl")]), tokenizer)[1]["hit"]
    # one record changed in place
    lines = train.read_text().splitlines()
    train.write_text("\n".join([lines[0].replace('"chosen": "', '"chosen": "Also ')] + lines[1:]) + "\n")
    changed, info = _run(data, tokenizer)
    assert not info["hit"] and changed.train[0].chosen_ids != base.train[0].chosen_ids
    # another max_length; another tokenizer
    assert not _run(dataclasses.replace(data, max_length=100), tokenizer)[1]["hit"]
    from preftune.models.tiny import synthetic_corpus

    other = train_tokenizer(synthetic_corpus(), vocab_size=280, out_dir=tmp_path / "tok2")
    retokenized, info = _run(data, other)
    assert not info["hit"] and retokenized.train != changed.train
    assert len(list(cache.glob("*.safetensors"))) == 4


def test_a_damaged_cache_file_is_a_miss_and_is_rewritten(tiny_model_dir: Path, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_preferences(10, seed=7))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    data = DataConfig(train=[str(train)], tokenized_cache_dir=str(tmp_path / "cache"))
    first, _ = _run(data, tokenizer)
    # The items read the file they came from (memory-mapped): take them out before it is overwritten in place.
    expected = list(first.train)
    for path in (tmp_path / "cache").glob("*.safetensors"):
        path.write_bytes(b"garbage")
    again, info = _run(data, tokenizer)
    assert not info["hit"] and again.train == expected
    assert _run(data, tokenizer)[1]["hit"]


def test_temporary_files_of_a_killed_writer_are_removed(tmp_path: Path) -> None:
    import os
    import time

    from preftune.data.cache import STALE_AFTER_S, remove_stale

    old = time.time() - 2 * STALE_AFTER_S
    dead = tmp_path / "k.safetensors.tmp999999999"  # no such process
    mine = tmp_path / f"k.safetensors.tmp{os.getpid()}"
    parent = tmp_path / f"k.json.tmp{os.getppid()}"  # a live process
    fresh = tmp_path / "j.safetensors.tmp999999998"  # dead, but written to a moment ago (another machine's writer?)
    for path in (dead, mine, parent, fresh):
        path.write_bytes(b"partial")
        if path is not fresh:
            os.utime(path, (old, old))
    assert remove_stale(tmp_path) == [dead]
    assert not dead.exists() and mine.exists() and parent.exists() and fresh.exists()

"""Shared fixtures: a tiny tokenizer and Llama saved to local folders, and learnable data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (safetensors) and its tokenizer, saved with save_pretrained."""
    from preftune.tiny import synthetic_corpus, tiny_llama, train_tokenizer

    folder = tmp_path_factory.mktemp("tiny-model")
    tokenizer = train_tokenizer(synthetic_corpus(), vocab_size=300, out_dir=folder)
    tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4, out_dir=folder)
    return folder


@pytest.fixture(scope="session")
def preference_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Train and held-out JSONL files whose preference follows a learnable rule."""
    from preftune.tiny import synthetic_preferences

    folder = tmp_path_factory.mktemp("prefs")
    train = write_jsonl(folder / "train.jsonl", synthetic_preferences(64, seed=1))
    held = write_jsonl(folder / "eval.jsonl", synthetic_preferences(32, seed=2))
    return train, held

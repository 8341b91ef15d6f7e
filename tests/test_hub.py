"""hub.py, models/tokenizer.py and data/hub.py: models and datasets by hub id, offline from a cache
the test builds in the huggingface_hub layout, and dataset folders in the hub's layout."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, run_cli, write_jsonl
from preftune.errors import PreftuneError

SHA = "0123456789abcdef0123456789abcdef01234567"


def hub_repo(cache: Path, repo_id: str, repo_type: str = "model") -> Path:
    """An empty snapshot folder of ``repo_id`` in the hub cache layout (refs/main -> snapshots/SHA)."""
    org, name = repo_id.split("/")
    repo = cache / f"{repo_type}s--{org}--{name}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SHA)
    snapshot = repo / "snapshots" / SHA
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def hub_layout_dataset(folder: Path, splits: dict[str, list[dict]]) -> Path:
    """A dataset folder as the hub holds one: a README card and one Parquet file per split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# Preference pairs for a test\n", encoding="utf-8")
    for split, rows in splits.items():
        pq.write_table(pa.Table.from_pylist(rows), folder / "data" / f"{split}-00000-of-00001.parquet")
    return folder


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from preftune.models.tiny import synthetic_corpus, synthetic_preferences, tiny_llama, train_tokenizer

    cache = tmp_path_factory.mktemp("hub-cache")
    model = hub_repo(cache, "preftune-test/tiny-llama")
    tokenizer = train_tokenizer(synthetic_corpus(), vocab_size=300, out_dir=model)
    tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4, out_dir=model)
    hub_layout_dataset(hub_repo(cache, "preftune-test/prefs", "dataset"),
                       {"train": synthetic_preferences(32, seed=1), "test": synthetic_preferences(8, seed=2)})
    return cache


@pytest.fixture
def offline(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_cache


def test_a_model_and_tokenizer_load_by_hub_id_from_the_cache(offline: Path) -> None:
    from preftune.config.schema import ModelConfig
    from preftune.models.load import load_causal_lm
    from preftune.models.tokenizer import load_tokenizer

    model = load_causal_lm(ModelConfig(path="preftune-test/tiny-llama"))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert load_tokenizer("preftune-test/tiny-llama").eos_token == "</s>"


def test_what_is_not_there_is_one_clear_line(offline: Path) -> None:
    from preftune.config.schema import ModelConfig
    from preftune.models.load import load_causal_lm

    with pytest.raises(PreftuneError) as err:
        load_causal_lm(ModelConfig(path="preftune-test/not-cached"))
    message = str(err.value)
    assert "\n" not in message
    for part in ("'preftune-test/not-cached'", str(offline), "offline", "hf download preftune-test/not-cached"):
        assert part in message, part
    assert message.startswith("model folder: no folder 'preftune-test/not-cached' (relative to ")  # the local path first, then the hub
    with pytest.raises(PreftuneError) as err:  # a path that cannot be a hub id gets no hub hint
        load_causal_lm(ModelConfig(path="/no/such/folder"))
    assert str(err.value).endswith("no folder '/no/such/folder'; nor can it be a Hugging Face hub id (org/name).")
    assert "hf download" not in str(err.value) and "relative to" not in str(err.value)


def test_a_dataset_by_hub_id_and_a_hub_layout_folder(offline: Path, tmp_path: Path) -> None:
    from preftune.config.schema import DataConfig
    from preftune.data.prepare import prepare
    from preftune.models.tiny import synthetic_preferences
    from preftune.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("preftune-test/tiny-llama")
    by_id = prepare(DataConfig(train=["preftune-test/prefs"], eval=["preftune-test/prefs"]), tokenizer, records="pairs", seed=0)
    assert (len(by_id.train), len(by_id.eval)) == (32, 8)
    assert by_id.reports["eval"]["files"] == ["preftune-test/prefs [test]"]
    folder = hub_layout_dataset(tmp_path / "local", {"train": synthetic_preferences(12, seed=3), "dev": synthetic_preferences(4, seed=4)})
    local = prepare(DataConfig(train=[str(folder)], eval=[str(folder)], eval_split="dev"), tokenizer, records="pairs", seed=0)
    assert (len(local.train), len(local.eval)) == (12, 4)
    with pytest.raises(PreftuneError, match=r"cannot load split 'validation'.*'train', 'dev'"):
        prepare(DataConfig(train=[str(folder)], train_split="validation"), tokenizer, records="pairs", seed=0)
    with pytest.raises(PreftuneError, match="dataset: no file or folder 'preftune-test/missing' .*as a Hugging Face hub id"):
        prepare(DataConfig(train=["preftune-test/missing"]), tokenizer, records="pairs", seed=0)


def _cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    return run_cli(*args, env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})


@pytest.mark.full
def test_preftune_dpo_with_a_hub_model_and_dataset_offline(hub_cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = _cli("dpo", str(REPO / "configs" / "dpo-tiny.yaml"), "--model.path=preftune-test/tiny-llama",
                  "--data.train=preftune-test/prefs", "--data.eval=preftune-test/prefs", f"--train.output_dir={run}",
                  "--train.max_steps=2", "--train.save_every=null", "--train.eval_every=null", "--train.progress=false",
                  "--train.report=false", cache=hub_cache)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (run / "final" / "config.json").is_file()
    assert json.loads((run / "data_report.json").read_text())["train"]["kept"] == 32
    missing = _cli("dpo", str(REPO / "configs" / "dpo-tiny.yaml"), "--model.path=someone/absent-model",
                   f"--data.train={write_jsonl(tmp_path / 'd.jsonl', [{'prompt': 'a', 'chosen': 'b', 'rejected': 'c'}])}",
                   f"--train.output_dir={tmp_path / 'absent'}", cache=hub_cache)
    assert missing.returncode == 2
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and "someone/absent-model" in lines[0] and "Traceback" not in missing.stderr, missing.stderr

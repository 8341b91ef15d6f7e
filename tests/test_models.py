"""Loading models from local folders: safetensors only, clear errors, LoRA, the chunked scorer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from preftune.config.schema import LoraConfig, ModelConfig
from preftune.errors import PreftuneError
from preftune.models.load import apply_lora, freeze, load_causal_lm, load_policy
from preftune.models.scorers import SequenceLogps
from preftune.models.tokenizer import load_tokenizer


def test_load_policy_and_tokenizer(tiny_model_dir: Path) -> None:
    model = load_causal_lm(ModelConfig(path=str(tiny_model_dir)))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.pad_token_id is not None


def test_bf16_dtype(tiny_model_dir: Path) -> None:
    model = load_causal_lm(ModelConfig(path=str(tiny_model_dir), dtype="bfloat16"))
    assert next(model.parameters()).dtype == torch.bfloat16


def test_pickled_weights_are_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bin-only"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder)
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(PreftuneError, match=r"no \.safetensors weights .*pytorch_model\.bin"):
        load_causal_lm(ModelConfig(path=str(folder)))


def test_missing_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(PreftuneError, match="no folder '.*nope'"):
        load_causal_lm(ModelConfig(path=str(tmp_path / "nope")))
    with pytest.raises(PreftuneError, match="no model folder given"):
        load_causal_lm(ModelConfig(path=""))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreftuneError, match="holds no tokenizer"):
        load_tokenizer(str(tmp_path / "empty"))


def test_lora_trains_only_adapters_and_checkpointing(tiny_model_dir: Path) -> None:
    import warnings

    cfg = ModelConfig(path=str(tiny_model_dir), gradient_checkpointing=True, lora=LoraConfig(enabled=True, r=4, target_modules=["q_proj", "v_proj"]))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*gradient_checkpointing_enable.*deprecated")  # transformers >= 5.25's name is used
        model = load_policy(cfg)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert model.get_base_model().model.gradient_checkpointing
    with pytest.raises(PreftuneError, match="could not add LoRA"):
        apply_lora(load_causal_lm(ModelConfig(path=str(tiny_model_dir))), LoraConfig(enabled=True, target_modules=["no_such_module"]))


def test_sequence_logps_matches_the_model_logits(tiny_model_dir: Path) -> None:
    model = freeze(load_causal_lm(ModelConfig(path=str(tiny_model_dir))))
    torch.manual_seed(0)
    input_ids = torch.randint(3, model.config.vocab_size, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    labels = input_ids.clone()
    labels[:, :5] = -100
    labels[attention_mask == 0] = -100
    logps, tokens = SequenceLogps(model, chunk_size=4)(input_ids, attention_mask, labels)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    lp = torch.log_softmax(logits[:, :-1], dim=-1)
    target = labels[:, 1:]
    mask = target != -100
    expected = (lp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(-1)
    assert torch.allclose(logps, expected, atol=1e-5)
    assert tokens.tolist() == mask.sum(-1).tolist()


def test_dropout_is_off_in_the_policy_by_default(tmp_path: Path) -> None:
    from preftune.models.tiny import synthetic_corpus, tiny_llama, train_tokenizer

    tokenizer = train_tokenizer(synthetic_corpus(), vocab_size=300, out_dir=tmp_path)
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4, out_dir=tmp_path)
    model.config.attention_dropout = 0.25
    model.save_pretrained(str(tmp_path))
    lora = LoraConfig(enabled=True, r=4, dropout=0.3, target_modules=["q_proj"])
    policy = load_policy(ModelConfig(path=str(tmp_path), lora=lora))
    dropouts = [m for m in policy.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)  # LoRA's dropout too
    assert policy.config.attention_dropout == 0.0
    kept = load_policy(ModelConfig(path=str(tmp_path), lora=lora, disable_dropout=False))
    assert kept.config.attention_dropout == 0.25 and any(m.p == 0.3 for m in kept.modules() if isinstance(m, torch.nn.Dropout))


def test_a_damaged_weights_file_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cut"
    shutil.copytree(tiny_model_dir, folder)
    weights_file = next(folder.glob("*.safetensors"))
    weights_file.write_bytes(weights_file.read_bytes()[: 200])  # a download cut short
    with pytest.raises(PreftuneError, match="could not load a causal LM from"):
        load_causal_lm(ModelConfig(path=str(folder)))


def test_data_beyond_the_models_vocabulary_is_a_clear_error(tiny_model_dir: Path, preference_files: tuple[Path, Path],
                                                            tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from preftune.stages.dpo import run as run_dpo

    folder = tmp_path / "bigger-tokenizer"
    shutil.copytree(tiny_model_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.add_tokens([f"newtoken{i}" for i in range(50)])
    tokenizer.save_pretrained(str(folder))
    data = tmp_path / "new-words.jsonl"
    data.write_text('{"prompt": "newtoken7 says", "chosen": " newtoken40", "rejected": " no"}\n' * 4)
    from conftest import dpo_config

    with pytest.raises(PreftuneError, match=r"token id \d+, but the model's vocabulary has \d+ rows"):
        run_dpo(dpo_config(folder, data, None, tmp_path / "run", "--train.max_steps=1", "--train.batch_size=2"))


def test_remote_code_is_never_enabled_by_a_run_folders_config(tiny_model_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from preftune.models import runs

    run = tmp_path / "downloaded-run"
    shutil.copytree(tiny_model_dir, run / "final")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"path": str(tiny_model_dir), "trust_remote_code": True}}))
    seen = []
    real = runs.load_causal_lm
    monkeypatch.setattr(runs, "load_causal_lm", lambda cfg, path=None: seen.append(cfg.trust_remote_code) or real(cfg, path))
    runs.load_model(runs.describe_model(run))
    runs.load_model(runs.describe_model(run), trust_remote_code=True)  # only the caller can ask for it
    assert seen == [False, True]

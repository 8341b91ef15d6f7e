"""models/adapters.py: a LoRA policy's reference is the model as it starts.

The usual two-step workflow (SFT with LoRA, then DPO on the trained adapter) is run the TRL way
and through ``preftune.dpo``: the step-1 loss is ln 2 in both (policy == reference), where the
base model with the adapter off (``reference.strategy=adapter``, warned) gives another number.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import read_metrics, tiny_lm
from preftune.models.adapters import REFERENCE_ADAPTER, adapter_is_zero, add_reference_adapter, using_adapter

STEP = dict(batch_size=4, max_steps=1, log_every=1, lr=1e-3, save_every=None, eval_every=None, progress=False, report=False)


def trained_adapter(model_dir: Path, out: Path) -> Path:
    """A LoRA adapter on the tiny model whose B matrices are not zero (as after SFT), saved."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir)),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    peft_model.save_pretrained(str(out))
    return out


def load_trained(model_dir: Path, adapter: Path):  # noqa: ANN201
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(adapter), is_trainable=True)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()][:8]


def test_a_fresh_adapter_is_zero_and_a_trained_one_is_copied_frozen() -> None:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_lm(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert adapter_is_zero(peft_model)
    with torch.no_grad():
        next(p for n, p in peft_model.named_parameters() if "lora_B" in n).add_(0.1)
    assert not adapter_is_zero(peft_model)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    ids = torch.tensor([[1, 5, 7, 9]])
    before = peft_model(input_ids=ids).logits
    assert add_reference_adapter(peft_model) == REFERENCE_ADAPTER
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == trainable  # the copy does not train
    with torch.no_grad():  # the policy moves on; the copy does not
        for name, param in peft_model.named_parameters():
            if "lora_B.default" in name:
                param.add_(1.0)
    with using_adapter(peft_model, REFERENCE_ADAPTER):
        torch.testing.assert_close(peft_model(input_ids=ids).logits, before, atol=1e-6, rtol=0)
        assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == trainable
    assert not torch.allclose(peft_model(input_ids=ids).logits, before)  # the trained adapter is active again


@pytest.mark.full
@pytest.mark.slow
def test_sft_lora_then_dpo_step_one_loss_equals_trls(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    import preftune

    adapter = trained_adapter(tiny_model_dir, tmp_path / "sft-adapter")
    data = records(preference_files[0])
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=1, learning_rate=1e-3, beta=0.1,
                     logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                     train_sampling_strategy="sequential", lr_scheduler_type="constant", model_init_kwargs={"dtype": "float32"})
    trainer = DPOTrainer(model=load_trained(tiny_model_dir, adapter), args=args, train_dataset=Dataset.from_list(data),
                         processing_class=tokenizer)
    trainer.train()
    trl_loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)

    ours = preftune.dpo(load_trained(tiny_model_dir, adapter), data, tokenizer=tokenizer, output_dir=str(tmp_path / "ours"), **STEP)
    loss = read_metrics(ours.run_dir)[0]["loss"]
    assert trl_loss == pytest.approx(math.log(2), abs=1e-5)
    assert loss == pytest.approx(trl_loss, abs=1e-5)
    info = json.loads((ours.run_dir / "reference.json").read_text())
    assert info["strategy"] == "adapter" and info["adapter"].startswith("frozen copy")
    final = ours.run_dir / "final"  # only the trained adapter is saved, never the reference copy
    assert (final / "adapter_model.safetensors").is_file() and not (final / REFERENCE_ADAPTER).exists()

    # asked for explicitly, the adapter off is the base model: another step-1 loss, and a warning
    with pytest.warns(UserWarning, match="base model with the adapter off"):
        base = preftune.dpo(load_trained(tiny_model_dir, adapter), data, tokenizer=tokenizer, output_dir=str(tmp_path / "base"),
                            reference={"strategy": "adapter"}, **STEP)
    assert abs(read_metrics(base.run_dir)[0]["loss"] - math.log(2)) > 1e-3

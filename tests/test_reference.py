"""reference.py: where reference log-probs come from.

The strategies (a frozen copy, the LoRA policy with its adapter off, an on-disk cache) give the
same losses; the cache is reused across runs and never read stale; every reference takes
prefix-shared batches; ``auto`` resolves by the loss and LoRA; the cache key covers the model,
the tokenizer, the tokenized data and the precision.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch

from conftest import TINY_PAD, dpo_config, random_pairs, read_metrics, tiny_lm
from preftune.config.schema import DPOConfig
from preftune.data.collate import collate_pairs, collate_prefix_shared
from preftune.errors import PreftuneError
from preftune.models.load import freeze
from preftune.models.scorers import SequenceLogps, SharedPrefixLogps
from preftune.stages.dpo import run as run_dpo
from preftune.training.reference import cache_key, hash_pairs, resolve_reference_strategy


# --------------------------------------------------------------------------- strategy resolution
def dpo(loss: str = "dpo", strategy: str = "auto", lora: bool = False, path: str | None = None) -> DPOConfig:
    cfg = DPOConfig()
    cfg.loss.name = loss
    cfg.reference.strategy = strategy
    cfg.model.lora.enabled = lora
    cfg.reference.path = path
    return cfg


@pytest.mark.parametrize("loss,lora,expected", [
    ("simpo", False, "none"),
    ("simpo", True, "none"),  # reference-free wins over LoRA
    ("orpo", False, "none"),
    ("dpo", True, "adapter"),
    ("ipo", True, "adapter"),
    ("dpo", False, "copy"),
    ("ipo", False, "copy"),
])
def test_auto_resolves_by_the_loss_and_lora(loss: str, lora: bool, expected: str) -> None:
    assert resolve_reference_strategy(dpo(loss, "auto", lora)) == expected


@pytest.mark.parametrize("loss,strategy,lora", [
    ("dpo", "copy", False), ("dpo", "cache", False), ("dpo", "copy", True), ("dpo", "cache", True), ("dpo", "adapter", True),
    ("simpo", "none", False), ("orpo", "none", True),
])
def test_an_explicit_strategy_is_kept(loss: str, strategy: str, lora: bool) -> None:
    assert resolve_reference_strategy(dpo(loss, strategy, lora)) == strategy


def test_impossible_strategies_are_clean_errors() -> None:
    with pytest.raises(PreftuneError, match="needs LoRA"):
        resolve_reference_strategy(dpo("dpo", "adapter", lora=False))
    with pytest.raises(PreftuneError, match="loss 'dpo' needs a reference model"):
        resolve_reference_strategy(dpo("dpo", "none"))
    with pytest.raises(PreftuneError, match="reference.path must be unset"):
        resolve_reference_strategy(dpo("dpo", "adapter", lora=True, path="/some/other/model"))
    same = dpo("dpo", "adapter", lora=True)
    same.reference.path = same.model.path  # naming the policy's own base model is allowed
    assert resolve_reference_strategy(same) == "adapter"


# --------------------------------------------------------------------------- cache keys
KEY = {"model_hash": "m" * 64, "tokenizer_hash": "t" * 64, "data_hash": "d" * 64, "precision": "float32"}


def test_cache_key_is_stable_and_changes_with_every_input() -> None:
    key = cache_key(**KEY)
    assert key == cache_key(**dict(reversed(list(KEY.items()))))  # same inputs, same key
    assert len(key) == 32 and all(c in "0123456789abcdef" for c in key)
    changed = {name: cache_key(**{**KEY, name: value}) for name, value in (
        ("model_hash", "M" * 64), ("tokenizer_hash", "T" * 64), ("data_hash", "D" * 64), ("precision", "float32+bf16autocast"))}
    assert key not in changed.values()
    assert len(set(changed.values())) == 4, changed


def test_the_data_hash_sees_every_token_and_the_boundaries() -> None:
    from preftune.data.records import TokenizedPair

    pairs = random_pairs(4, seed=7)
    base = hash_pairs(pairs)
    assert base == hash_pairs(random_pairs(4, seed=7))
    edited = random_pairs(4, seed=7)
    edited[2].rejected_ids[-1] = edited[2].rejected_ids[-1] % 60 + 1  # one token, another id
    assert hash_pairs(edited) != base
    assert hash_pairs(pairs[:3]) != base
    # the same ids split differently between prompt and completion are other data
    moved = TokenizedPair(prompt_ids=[1, 2], chosen_ids=[3], rejected_ids=[4], index=0)
    other = TokenizedPair(prompt_ids=[1], chosen_ids=[2, 3], rejected_ids=[4], index=0)
    assert hash_pairs([moved]) != hash_pairs([other])


# --------------------------------------------------------------------------- references on batches
def test_adapter_off_and_cached_references_take_shared_batches(tmp_path: Path) -> None:
    from preftune.config.schema import LoraConfig
    from preftune.models.load import apply_lora
    from preftune.training.reference import (
        AdapterOffReference,
        FrozenCopyReference,
        load_or_compute_cache,
    )

    pairs = random_pairs(5, seed=4)
    batch = collate_prefix_shared(pairs, TINY_PAD)
    peft_model = apply_lora(tiny_lm(), LoraConfig(enabled=True, r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # LoRA's B starts at zero: make the adapter matter, so switching it off is tested
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    adapter_off = AdapterOffReference(SharedPrefixLogps(peft_model)).logps(batch)
    base = FrozenCopyReference(SequenceLogps(freeze(tiny_lm()))).logps(collate_pairs(pairs, TINY_PAD))
    for got, want in zip(adapter_off, base):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    cached, warm = load_or_compute_cache(
        cache_dir=tmp_path, key="k", pairs=pairs, scorer_factory=lambda: SequenceLogps(freeze(tiny_lm())),
        collate=partial(collate_pairs, pad_token_id=TINY_PAD), batch_size=2, device=torch.device("cpu"), autocast=torch.no_grad,
    )
    for got, want in zip(cached.logps({**batch, "index": batch["index"].flip(0)}), base):
        torch.testing.assert_close(got, want.flip(0), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- strategies in DPO runs
@pytest.mark.fp32_exact
def test_reference_strategies_give_the_same_losses(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    train, held = preference_files
    common = ["--model.lora.enabled=true", "--model.lora.r=4", "--train.max_steps=4", "--train.log_every=1",
              "--train.save_every=null", "--train.eval_every=2", f"--reference.cache_dir={tmp_path / 'cache'}"]
    losses = {}
    for strategy in ("copy", "adapter", "cache"):
        run = run_dpo(dpo_config(tiny_model_dir, train, held, tmp_path / strategy, f"--reference.strategy={strategy}", *common))
        losses[strategy] = [(m["step"], m.get("loss", m.get("eval/loss"))) for m in read_metrics(run)]
        assert (run / "final" / "adapter_config.json").is_file()  # LoRA saves the adapter
    assert losses["copy"][0][1] == pytest.approx(0.693147, abs=1e-5)  # zero-initialised LoRA: policy == reference
    for strategy in ("adapter", "cache"):
        assert [s for s, _ in losses[strategy]] == [s for s, _ in losses["copy"]]
        assert [v for _, v in losses[strategy]] == pytest.approx([v for _, v in losses["copy"]], abs=1e-6), strategy
    assert losses["copy"][-1][1] < losses["copy"][0][1]


def test_reference_cache_is_reused_and_never_stale(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    train, held = preference_files
    cache = tmp_path / "cache"
    common = ["--reference.strategy=cache", f"--reference.cache_dir={cache}", "--train.max_steps=2", "--train.save_every=null",
              "--train.eval_every=null"]
    first = run_dpo(dpo_config(tiny_model_dir, train, held, tmp_path / "a", *common))
    info = json.loads((first / "reference.json").read_text())
    assert info["train_cache"]["warm"] is False and info["eval_cache"]["warm"] is False
    # a sweep over beta and the loss reuses the same cache
    again = run_dpo(dpo_config(tiny_model_dir, train, held, tmp_path / "b", *common, "--loss.beta=0.5", "--loss.name=ipo"))
    info2 = json.loads((again / "reference.json").read_text())
    assert {k: info2["train_cache"][k] for k in ("path", "warm")} == {"path": info["train_cache"]["path"], "warm": True}
    assert info2["train_cache"]["seconds"] >= 0  # how long the cache took to read (or, when cold, to compute)
    # other tokenized data (a shorter max_length cuts completions) gets another key, computed anew
    cut = run_dpo(dpo_config(tiny_model_dir, train, held, tmp_path / "c", *common, "--data.max_length=12", "--data.max_prompt_length=6"))
    info3 = json.loads((cut / "reference.json").read_text())
    assert info3["train_cache"]["warm"] is False and info3["train_cache"]["path"] != info["train_cache"]["path"]
    assert len(list(cache.glob("*.safetensors"))) == 4


# --------------------------------------------------------------------------- TR-DPO reference syncing
def test_reference_sync_is_the_tr_dpo_update_at_every_kth_step() -> None:
    from preftune.training.reference import ReferenceSync

    policy, reference = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    start = [p.detach().clone() for p in reference.parameters()]
    ReferenceSync(policy, reference, alpha=0.6, steps=3)(2)  # not a sync step: unchanged
    assert all(torch.equal(p, s) for p, s in zip(reference.parameters(), start))
    ReferenceSync(policy, reference, alpha=0.6, steps=3)(3)  # soft: 0.6 policy + 0.4 reference
    for p, s, q in zip(reference.parameters(), start, policy.parameters()):
        assert torch.allclose(p, 0.6 * q + 0.4 * s, atol=1e-7)
    ReferenceSync(policy, reference, alpha=1.0, steps=3)(6)  # hard: the policy itself
    assert all(torch.equal(p, q) for p, q in zip(reference.parameters(), policy.parameters()))
    assert all(not p.requires_grad or p.grad is None for p in reference.parameters())


def test_a_tr_dpo_run_replaces_the_reference_at_the_sync_step(tiny_model_dir: Path, preference_files: tuple[Path, Path],
                                                                tmp_path: Path) -> None:
    train, _ = preference_files
    common = ["--train.max_steps=4", "--train.log_every=1", "--train.save_every=null", "--train.eval_every=null", "--train.lr=1e-2",
              "--reference.strategy=copy", "--reference.sync_ref_model=true", "--reference.ref_model_sync_steps=2"]
    hard = run_dpo(dpo_config(tiny_model_dir, train, None, tmp_path / "hard", *common, "--reference.ref_model_mixup_alpha=1.0"))
    rewards = [(m["rewards/chosen"], m["rewards/rejected"]) for m in read_metrics(hard) if "rewards/chosen" in m]
    assert len(rewards) == 4
    # step 1 starts at the reference; steps 2 and 4 have moved away; after step 2's update the reference IS the policy,
    # so step 3's forward sees a policy equal to its reference again
    for step in (0, 2):
        assert rewards[step] == pytest.approx((0.0, 0.0), abs=1e-6), (step + 1, rewards)
    for step in (1, 3):
        assert abs(rewards[step][0]) + abs(rewards[step][1]) > 1e-4, (step + 1, rewards)
    assert "sync_ref_model: true" in (hard / "config.yaml").read_text()


def test_tr_dpo_is_refused_where_the_reference_cannot_move(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    from preftune.config.schema import KTOConfig, load_config
    from preftune.errors import ConfigError

    train, _ = preference_files
    for extra, message in ((["--reference.strategy=cache"], "a cache holds the log-probs of the reference as the run starts"),
                           (["--reference.strategy=adapter", "--model.lora.enabled=true"], "the policy's own base weights"),
                           (["--loss.name=simpo", "--reference.strategy=none"], "the loss is reference-free"),
                           (["--train.resume_from=latest"], "cannot resume a run")):
        with pytest.raises(PreftuneError, match=message):
            run_dpo(dpo_config(tiny_model_dir, train, None, tmp_path / "x", "--reference.sync_ref_model=true", *extra))
    with pytest.raises(ConfigError, match="ref_model_mixup_alpha must be in"):
        dpo_config(tiny_model_dir, train, None, tmp_path / "y", "--reference.ref_model_mixup_alpha=0")
    with pytest.raises(ConfigError, match="is for `preftune dpo`"):
        load_config(KTOConfig, None, ["--reference.sync_ref_model=true"])


def test_ld_dpo_reference_log_probs_are_cached_under_their_own_key(tiny_model_dir: Path, preference_files: tuple[Path, Path],
                                                                    tmp_path: Path) -> None:
    """LD-DPO weighs the reference's tails as the policy's: a cache of plain sums is never read for it."""
    train, _ = preference_files
    common = ["--train.max_steps=1", "--train.log_every=1", "--train.save_every=null", "--train.eval_every=null",
              "--reference.strategy=cache", f"--reference.cache_dir={tmp_path / 'cache'}"]
    plain = run_dpo(dpo_config(tiny_model_dir, train, None, tmp_path / "plain", *common))
    ld = run_dpo(dpo_config(tiny_model_dir, train, None, tmp_path / "ld", *common, "--loss.ld_alpha=0.4"))
    again = run_dpo(dpo_config(tiny_model_dir, train, None, tmp_path / "again", *common, "--loss.ld_alpha=0.4"))
    warm = [json.loads((run / "reference.json").read_text())["train_cache"]["warm"] for run in (plain, ld, again)]
    assert warm == [False, False, True]
    for run in (plain, ld):  # the start point: policy == reference, in LD-DPO's sums too
        assert read_metrics(run)[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    with pytest.raises(Exception, match="ld_alpha must be in"):
        dpo_config(tiny_model_dir, train, None, tmp_path / "bad", "--loss.ld_alpha=1.5")


def test_a_bf16_runs_reference_copy_holds_its_layer_matrices_in_bf16_with_the_same_logps() -> None:
    """Under bf16 autocast every matmul casts its fp32 weight to bf16 anyway: storing the frozen copy's layer
    matrices in bf16 halves their bytes and gives bitwise the same reference log-probs (the planner counts them so)."""
    from preftune.training.reference import FrozenCopyReference, layer_matrices_to_bf16

    batch = collate_pairs(random_pairs(6, seed=3), TINY_PAD)
    fp32, half = FrozenCopyReference(SequenceLogps(freeze(tiny_lm()))), FrozenCopyReference(SequenceLogps(layer_matrices_to_bf16(freeze(tiny_lm()))))
    dtypes = {name: p.dtype for name, p in half.scorer.named_parameters()}
    assert {dtypes[n] for n in dtypes if ".layers." in n and n.endswith("proj.weight")} == {torch.bfloat16}
    assert {dtypes[n] for n in dtypes if ".layers." not in n or "norm" in n} == {torch.float32}  # embeddings, norms, head
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = fp32.logps(batch), half.logps(batch)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)

"""`preftune dpo`: the preference-loss family on the one training loop.

Builds the pieces (tokenizer, data, policy, reference, objective), then hands them to
:func:`preftune.train.fit`. The objective scores chosen and rejected in one forward over the
concatenated batch, asks the reference for its log-probs, and applies the configured loss.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preftune.config import DPOConfig, to_yaml
from preftune.data.records import DataReport, TokenizedPair
from preftune.errors import PreftuneError
from preftune.losses import REFERENCE_FREE, LOSSES, loss_hparam_names, preference_loss, split_pair
from preftune.reference import (
    AdapterOffReference,
    FrozenCopyReference,
    Reference,
    cache_key,
    hash_files,
    hash_pairs,
    load_or_compute_cache,
)

#: A user-supplied extra loss term: (policy PairLogps, reference PairLogps | None) -> scalar.
ExtraTerm = Callable[..., torch.Tensor]

WEIGHT_FILES = ("*.safetensors", "config.json")
TOKENIZER_FILES = ("tokenizer*.json", "special_tokens_map.json", "chat_template.*", "*.model", "vocab*", "merges.txt")


def resolve_reference_strategy(cfg: DPOConfig) -> str:
    """``auto`` -> ``none`` for reference-free losses, ``adapter`` with LoRA, else ``copy``."""
    strategy = cfg.reference.strategy
    reference_free = cfg.loss.name in REFERENCE_FREE
    if strategy == "auto":
        if reference_free:
            return "none"
        return "adapter" if cfg.model.lora.enabled else "copy"
    if strategy == "none" and not reference_free:
        raise PreftuneError(f"loss '{cfg.loss.name}' needs a reference model: set reference.strategy to copy, adapter or cache.")
    if strategy == "adapter" and not cfg.model.lora.enabled:
        raise PreftuneError("reference.strategy=adapter needs LoRA (model.lora.enabled=true): without an adapter there is nothing to switch off.")
    if strategy == "adapter" and cfg.reference.path not in (None, cfg.model.path):
        raise PreftuneError("reference.strategy=adapter uses the policy's own base weights; reference.path must be unset.")
    return strategy


def loss_hparams(cfg: DPOConfig) -> dict[str, Any]:
    """The loss config fields the chosen loss takes (each loss reads only its own)."""
    names = loss_hparam_names(cfg.loss.name)
    values = dataclasses.asdict(cfg.loss)
    return {name: values[name] for name in names if name in values}


def _loss_config_checked(cfg: DPOConfig) -> None:
    if cfg.loss.name not in LOSSES:
        import difflib

        match = difflib.get_close_matches(cfg.loss.name, list(LOSSES), n=1)
        hint = f" Did you mean '{match[0]}'?" if match else ""
        raise PreftuneError(f"unknown loss.name '{cfg.loss.name}'.{hint} Known: {', '.join(sorted(LOSSES))}.")
    if cfg.loss.name == "kto":
        raise PreftuneError("loss.name=kto trains on unpaired data; `preftune dpo` takes paired losses (KTO end to end is not wired yet).")


def make_loss_fn(
    cfg: DPOConfig, reference: Reference, extra_terms: Sequence[ExtraTerm] = ()
) -> Callable[[nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """(scorer, batch) -> (weighted mean loss, per-example metrics with the ecosystem's names)."""
    hparams = loss_hparams(cfg)

    def loss_fn(scorer: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps, tokens = scorer(batch["input_ids"], batch["attention_mask"], batch["labels"])
        policy = split_pair(logps, tokens)
        ref = reference.logps(batch)
        preference = batch["preference"]
        out = preference_loss(
            cfg.loss.name,
            policy,
            ref,
            nll_alpha=cfg.loss.nll_alpha,
            extra_terms=extra_terms,
            preference=None if bool((preference == 1.0).all()) else preference,
            **hparams,
        )
        loss = out.reduce(batch["weight"])
        margins = out.chosen_rewards - out.rejected_rewards
        metrics = {
            "rewards/chosen": out.chosen_rewards.detach(),
            "rewards/rejected": out.rejected_rewards.detach(),
            "rewards/margins": margins.detach(),
            "rewards/accuracies": (margins > 0).float().detach(),
            "logps/chosen": policy.chosen.detach(),
            "logps/rejected": policy.rejected.detach(),
        }
        for name, value in out.metrics.items():
            metrics.setdefault(name, value.detach())
        return loss, metrics

    return loss_fn


def split_eval(pairs: list[TokenizedPair], fraction: float, seed: int) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    if fraction <= 0:
        return pairs, []
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * len(pairs)))
    held = set(order[:n_eval])
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def _reindex(pairs: list[TokenizedPair]) -> list[TokenizedPair]:
    """Number the pairs 0..n-1 in order: the key of cached reference rows."""
    return [dataclasses.replace(p, index=i) for i, p in enumerate(pairs)]


def prepare_pairs(cfg: DPOConfig, tokenizer: Any) -> tuple[list[TokenizedPair], list[TokenizedPair], dict[str, Any]]:
    """Load, validate, tokenize and split the data; return train, eval and the data report."""
    from preftune.data import load_examples
    from preftune.data.tokenize import tokenize_pairs

    if not cfg.data.train:
        raise PreftuneError("no training data: set data.train to one or more files.")
    reports: dict[str, Any] = {}
    splits = {"train": cfg.data.train, "eval": cfg.data.eval}
    tokenized: dict[str, list[TokenizedPair]] = {}
    for split, paths in splits.items():
        if not paths:
            tokenized[split] = []
            continue
        result = load_examples(paths, format=cfg.data.format, columns=cfg.data.columns or None,
                               on_error=cfg.data.on_error, system=cfg.data.system, max_records=cfg.data.max_records)
        report: DataReport = result.report
        pairs = tokenize_pairs(result.examples, tokenizer, max_length=cfg.data.max_length,
                               max_prompt_length=cfg.data.max_prompt_length, on_overflow=cfg.data.on_overflow, report=report)
        tokenized[split] = pairs
        reports[split] = dataclasses.asdict(report)
    train, held = tokenized["train"], tokenized["eval"]
    if not held and cfg.data.eval_fraction > 0:
        train, held = split_eval(train, cfg.data.eval_fraction, cfg.train.seed)
    return _reindex(train), _reindex(held), reports


def build_reference(cfg: DPOConfig, strategy: str, policy_scorer: nn.Module, train: list[TokenizedPair],
                    held: list[TokenizedPair], collate: Callable, device: torch.device,
                    scorer_cls: type[nn.Module] | None = None) -> tuple[Reference, Reference, dict[str, Any]]:
    """The reference for the train and eval sets (the same object unless cached).

    ``scorer_cls`` scores ``collate``'s batches (``SequenceLogps`` or ``SharedPrefixLogps``).
    """
    from preftune.models import SequenceLogps, freeze, load_causal_lm

    scorer_cls = scorer_cls or SequenceLogps
    ref_path = cfg.reference.path or cfg.model.path
    info: dict[str, Any] = {"strategy": strategy, "path": ref_path if strategy in ("copy", "cache") else None}

    def copy_scorer() -> nn.Module:
        return scorer_cls(freeze(load_causal_lm(cfg.model, ref_path)), chunk_size=cfg.train.logprob_chunk_size).to(device)

    if strategy == "none":
        return Reference(), Reference(), info
    if strategy == "adapter":
        ref = AdapterOffReference(policy_scorer)
        return ref, ref, info
    if strategy == "copy":
        ref = FrozenCopyReference(copy_scorer())
        return ref, ref, info
    # cache
    from contextlib import nullcontext

    model_hash = hash_files(ref_path, WEIGHT_FILES)
    tokenizer_hash = hash_files(cfg.model.tokenizer or cfg.model.path, TOKENIZER_FILES)
    precision = f"{cfg.model.dtype}{'+bf16autocast' if cfg.train.bf16 else ''}"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.train.bf16 else nullcontext
    refs = []
    for split, pairs in (("train", train), ("eval", held)):
        if not pairs:  # no eval set: nothing to compute or cache
            refs.append(Reference())
            continue
        key = cache_key(model_hash=model_hash, tokenizer_hash=tokenizer_hash, data_hash=hash_pairs(pairs), precision=precision)
        ref, warm = load_or_compute_cache(cache_dir=cfg.reference.cache_dir, key=key, pairs=pairs, scorer_factory=copy_scorer,
                                          collate=collate, batch_size=cfg.train.eval_batch_size or cfg.train.batch_size,
                                          device=device, autocast=autocast)
        info[f"{split}_cache"] = {"path": str(ref.path), "warm": warm}
        refs.append(ref)
    return refs[0], refs[1], info


def use_prefix_sharing(cfg: DPOConfig, policy: nn.Module, pairs: Sequence[TokenizedPair]) -> tuple[bool, str | None]:
    """``data.prefix_sharing``, unless the attention or the data cannot take it: (on, why off)."""
    from preftune.models import causal_lm_of
    from preftune.prefix import MASKED_ATTENTION

    if not cfg.data.prefix_sharing:
        return False, None
    implementation = getattr(causal_lm_of(policy).config, "_attn_implementation", None) or "eager"
    if implementation not in MASKED_ATTENTION:
        return False, f"attention '{implementation}' takes no 4D mask (set model.attn_implementation=sdpa or eager)"
    empty = sum(1 for p in pairs if not p.prompt_ids)
    if empty:
        return False, f"{empty} pair(s) have an empty prompt"
    return True, None


def run_dpo(cfg: DPOConfig, *, extra_terms: Sequence[ExtraTerm] = ()) -> Path:
    """Train as ``cfg`` says; return the run folder. ``extra_terms`` are added to the loss."""
    from preftune.data.collate import collate_pairs
    from preftune.models import SequenceLogps, load_policy, load_tokenizer
    from preftune.prefix import SharedPrefixLogps, collate_prefix_shared
    from preftune.train import Task, fit, seed_everything

    _loss_config_checked(cfg)
    strategy = resolve_reference_strategy(cfg)
    run_dir = Path(cfg.train.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")

    seed_everything(cfg.train.seed, deterministic=cfg.train.deterministic)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    train, held, reports = prepare_pairs(cfg, tokenizer)
    if not train:
        raise PreftuneError("no training pairs are left after loading and truncation; see data_report.json.")
    (run_dir / "data_report.json").write_text(json.dumps(reports, indent=1), encoding="utf-8")

    policy = load_policy(cfg.model)
    shared, why_not = use_prefix_sharing(cfg, policy, train + held)
    if why_not:
        print(f"preftune: prefix sharing is off: {why_not}; using the concatenated layout", file=sys.stderr)
    scorer_cls = SharedPrefixLogps if shared else SequenceLogps
    scorer = scorer_cls(policy, chunk_size=cfg.train.logprob_chunk_size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    collate = partial(collate_prefix_shared if shared else collate_pairs, pad_token_id=tokenizer.pad_token_id)
    train_ref, eval_ref, ref_info = build_reference(cfg, strategy, scorer, train, held, collate, device, scorer_cls)
    ref_info["layout"] = "prefix_shared" if shared else "concatenated"
    if why_not:
        ref_info["prefix_sharing_off"] = why_not
    (run_dir / "reference.json").write_text(json.dumps(ref_info, indent=1), encoding="utf-8")

    train_fn = make_loss_fn(cfg, train_ref, extra_terms)
    eval_fn = make_loss_fn(cfg, eval_ref, extra_terms)
    # Eval batches hold eval-set indices, so they must read the eval reference.
    def loss_fn(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return (train_fn if model.training else eval_fn)(model, batch)

    def save_final(folder: Path) -> None:
        save_policy(policy, tokenizer, folder, merge=cfg.model.lora.merge_on_save)
        (folder / "preftune_config.yaml").write_text(to_yaml(cfg), encoding="utf-8")

    # Length grouping sorts by what one row holds: P+C+R shared, P+max(C, R) concatenated.
    lengths = [p.shared_length if shared else p.length for p in train]
    task = Task(model=scorer, loss_fn=loss_fn, train_set=train, collate=collate, lengths=lengths,
                eval_set=held, save_final=save_final, group_by_length=cfg.data.group_by_length)
    fit(task, cfg.train, run_dir)
    return run_dir


def save_policy(policy: nn.Module, tokenizer: Any, folder: Path, *, merge: bool = False) -> None:
    """``save_pretrained`` (safetensors) + tokenizer; with LoRA the adapter, and merged weights on request."""
    folder.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    if merge and hasattr(policy, "merge_and_unload"):
        import copy

        merged = copy.deepcopy(policy).merge_and_unload()
        merged.save_pretrained(str(folder / "merged"), safe_serialization=True)
        tokenizer.save_pretrained(str(folder / "merged"))

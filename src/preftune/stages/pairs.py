"""The task of a stage that trains on rows of two completions against a reference: DPO's pairs
(chosen, rejected) and KTO's rows (own completion, mismatched completion).

Both stages resolve the reference, choose the layout (one prefix-shared row per item, or the
concatenated batch), build the scorer, the collator and the references, write
``reference.json``, and switch between the train and eval references by the model's mode; here
that is written once, and a stage brings only its rows and its loss.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from preftune.data.collate import MASKED_ATTENTION, collate_pairs, collate_prefix_shared
from preftune.errors import PreftuneError
from preftune.models.load import has_adapter
from preftune.models.scorers import SequenceLogps, SharedPrefixLogps, causal_lm_of
from preftune.stages.lifecycle import Given, Run, count_weight, policy_saver
from preftune.system import distributed
from preftune.training.reference import FrozenCopyReference, Reference, ReferenceSync, build_reference, resolve_reference_strategy, sync_problem
from preftune.training.sharding import shard_model
from preftune.training.task import Task

#: (reference) -> the loop's loss function scoring rows against that reference
MakeLoss = Callable[[Reference], Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]]


def reference_strategy(cfg: Any, given: Given) -> tuple[str, nn.Module | None]:
    """The reference strategy, and the reference model already in memory: the caller's
    ``ref_model``, or, for a model passed in, an exact copy of it as it starts."""
    strategy = resolve_reference_strategy(cfg, adapter=cfg.model.lora.enabled or has_adapter(given.model),
                                          given_reference=given.ref_model is not None)
    if getattr(cfg.reference, "sync_ref_model", False):  # (a resume is refused with the config: config/schema.py)
        problem = sync_problem(strategy)
        if problem:
            raise PreftuneError(problem)
    ref_model = given.ref_model
    if ref_model is not None and cfg.reference.sync_ref_model:
        ref_model = copy.deepcopy(ref_model)  # syncing writes into the reference: never into the caller's model
    if ref_model is None and given.model is not None and strategy in ("copy", "cache") and not cfg.reference.path:
        ref_model = copy.deepcopy(given.model)  # taken before training touches the policy
    return strategy, ref_model


def pair_task(cfg: Any, run: Run, given: Given, policy: nn.Module, train_rows: Sequence[Any], eval_rows: Sequence[Any],
              make_loss: MakeLoss, *, strategy: str, ref_model: nn.Module | None,
              scorer_cls: type[nn.Module] | None = None) -> Task:
    """The loop's task for two-completion rows (:class:`~preftune.data.records.TokenizedPair`).

    ``scorer_cls`` replaces :class:`SequenceLogps` in the concatenated layout (the benchmarks'
    full-logits baseline); prefix-shared rows always use :class:`SharedPrefixLogps`.
    """
    shared, why_not = use_prefix_sharing(cfg, policy, list(train_rows) + list(eval_rows))
    run.about.append(f"reference {strategy}" + (f" (layout concatenated: prefix sharing is off: {why_not})" if why_not else ""))
    scorer_cls = SharedPrefixLogps if shared else (scorer_cls or SequenceLogps)
    options = {"wpo": True} if getattr(cfg.loss, "use_weighting", False) else {}  # WPO: the policy's aligned log-probs too
    if getattr(cfg.loss, "ld_alpha", None) is not None:  # LD-DPO: the policy and every reference weigh the tails
        options["ld_alpha"] = cfg.loss.ld_alpha
    scorer = scorer_cls(policy, chunk_size=cfg.train.logprob_chunk_size, **options)
    collate = partial(collate_prefix_shared if shared else collate_pairs, pad_token_id=run.tokenizer.pad_token_id)
    # the run's plan completed before the reference is built: a reference copy (and the cache pass) run as the policy does
    plan = run.decide(policy, len(train_rows))
    compile_choice, precision = plan.compile, plan.precision
    train_ref, eval_ref, ref_info = build_reference(cfg, strategy, scorer, train_rows, eval_rows, collate, run.device, scorer_cls,
                                                    ref_model=ref_model, tokenizer=given.tokenizer, compile=compile_choice.on,
                                                    bf16=precision.bf16)
    if cfg.train.sharding == "fsdp" and isinstance(train_ref, FrozenCopyReference):  # sharded as the policy is, frozen
        shard_model(train_ref.scorer, bf16=precision.bf16)
    ref_info["layout"] = "prefix_shared" if shared else "concatenated"
    if why_not:
        ref_info["prefix_sharing_off"] = why_not
    if distributed.is_main():
        (run.dir / "reference.json").write_text(json.dumps(ref_info, indent=1), encoding="utf-8")
    train_fn, eval_fn = make_loss(train_ref), make_loss(eval_ref)
    after_step = None
    if cfg.reference.sync_ref_model:
        assert isinstance(train_ref, FrozenCopyReference)  # sync_problem refused the others before anything was built
        after_step = ReferenceSync(policy, train_ref.scorer, alpha=cfg.reference.ref_model_mixup_alpha, steps=cfg.reference.ref_model_sync_steps)

    # Eval batches hold eval-set indices, so they must read the eval reference.
    def loss_fn(model: nn.Module, batch: dict[str, Any], totals: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return (train_fn if model.training else eval_fn)(model, batch, totals)

    # Length grouping sorts by what one row holds: P+C+R shared, P+max(C, R) concatenated.
    lengths = [p.shared_length if shared else p.length for p in train_rows]
    return Task(model=scorer, loss_fn=loss_fn, train_set=train_rows, collate=collate, lengths=lengths, counts=count_weight,
                eval_set=eval_rows, save_final=policy_saver(run, policy), group_by_length=cfg.data.group_by_length,
                output=policy, after_step=after_step)


def use_prefix_sharing(cfg: Any, policy: nn.Module, pairs: Sequence[Any]) -> tuple[bool, str | None]:
    """``data.prefix_sharing``, unless the attention or the data cannot take it: (on, why off)."""
    if not cfg.data.prefix_sharing:
        return False, None
    implementation = getattr(causal_lm_of(policy).config, "_attn_implementation", None) or "eager"
    if implementation not in MASKED_ATTENTION:
        return False, f"attention '{implementation}' takes no 4D mask (set model.attn_implementation=sdpa or eager)"
    empty = sum(1 for p in pairs if not p.prompt_ids)
    if empty:
        return False, f"{empty} pair(s) have an empty prompt"
    return True, None

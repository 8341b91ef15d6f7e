"""`preftune dpo`: the preference-loss family on the one training loop.

:func:`build_task` builds the pieces (run folder, data, policy, layout, reference, objective)
and returns the loop's task; :func:`run` trains it. The objective scores chosen and rejected in
one forward (one prefix-shared row per pair, or the concatenated batch), asks the reference for
its log-probs, and applies the configured loss of :mod:`preftune.losses`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preftune.config.schema import DPOConfig
from preftune.data.prepare import prepare
from preftune.losses import ExtraTerm, loss_hparam_names, preference_loss, split_pair, wpo_weights
from preftune.models.load import check_vocabulary, load_policy
from preftune.stages.lifecycle import Run, open_run, record_data
from preftune.stages.pairs import pair_task, reference_strategy
from preftune.training.reference import Reference
from preftune.training.task import Task


def loss_hparams(cfg: DPOConfig) -> dict[str, Any]:
    """The loss config fields the chosen loss takes (each loss reads only its own)."""
    names = loss_hparam_names(cfg.loss.name)
    values = dataclasses.asdict(cfg.loss)
    return {name: values[name] for name in names if name in values}


def make_loss_fn(
    cfg: DPOConfig, reference: Reference, extra_terms: Sequence[ExtraTerm] = ()
) -> Callable[[nn.Module, dict[str, Any], dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """(scorer, batch, totals) -> (the batch's share of the weighted mean loss, per-pair metrics
    with the ecosystem's names); ``totals["weight"]`` is the step's total weight (:func:`count_weight`)."""
    hparams = loss_hparams(cfg)

    def loss_fn(scorer: nn.Module, batch: dict[str, Any], totals: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps, tokens, *aligned = scorer(batch["input_ids"], batch["attention_mask"], batch["labels"])
        policy = split_pair(logps, tokens)
        pair_weights = wpo_weights(split_pair(aligned[0], tokens)) if aligned else None  # loss.use_weighting
        ref = reference.logps(batch)
        preference = batch["preference"]
        out = preference_loss(
            cfg.loss.name,
            policy,
            ref,
            weights=cfg.loss.weights,
            nll_alpha=cfg.loss.nll_alpha,
            extra_terms=extra_terms,
            preference=None if bool((preference == 1.0).all()) else preference,
            pair_weights=pair_weights,
            **hparams,
        )
        loss = out.reduce(batch["weight"], totals["weight"].to(logps.device))
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
        if pair_weights is not None:
            metrics["wpo_weight"] = pair_weights.detach()
        return loss, metrics

    return loss_fn


def build_task(cfg: DPOConfig, run: Run, *, extra_terms: Sequence[ExtraTerm] = (),
               scorer_cls: type[nn.Module] | None = None) -> Task:
    """Everything the loop needs to train ``cfg`` in ``run`` (:func:`~preftune.stages.lifecycle.open_run`);
    writes data_report.json and reference.json.

    ``run.given`` holds what a Python caller passed in memory (model, tokenizer, reference, data).
    ``extra_terms`` are added to the loss. ``scorer_cls`` replaces :class:`SequenceLogps` as the
    log-prob module of the concatenated layout, for the policy and a reference copy alike (the
    benchmarks' full-logits baseline); prefix-shared rows always use :class:`SharedPrefixLogps`.
    """
    given = run.given
    strategy, ref_model = reference_strategy(cfg, given)
    data = prepare(cfg.data, run.tokenizer, records="pairs", seed=cfg.train.seed, sources=given.sources(),
                   progress=cfg.train.progress)
    record_data(run, data.reports, data.train, "pairs")
    policy = load_policy(cfg.model, given.model)
    check_vocabulary(policy, data.train + data.eval, "data")
    return pair_task(cfg, run, given, policy, data.train, data.eval, lambda reference: make_loss_fn(cfg, reference, extra_terms),
                     strategy=strategy, ref_model=ref_model, scorer_cls=scorer_cls)

def run(cfg: DPOConfig, *, extra_terms: Sequence[ExtraTerm] = ()) -> Path:
    """Train as ``cfg`` says; return the run folder. ``extra_terms`` are added to the loss."""
    with open_run(cfg) as run:
        run.train(build_task(cfg, run, extra_terms=extra_terms))
    return Path(cfg.train.output_dir)

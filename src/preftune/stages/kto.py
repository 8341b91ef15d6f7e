"""`preftune kto`: KTO (Ethayarajh et al. 2024) on unpaired, thumbs-up / thumbs-down feedback.

A verb of its own rather than ``loss.name=kto`` in ``preftune dpo``: its data are unpaired
records (``prompt``, ``completion``, ``label``), its data report and its loss settings (beta,
the desirable and undesirable weights) are its own, and ``preftune dpo`` keeps refusing unpaired
data with a clear error instead of half-accepting it.

Each record becomes two rows (:func:`~preftune.data.prepare.mismatched_pairs`): its prompt with
its own completion, and with another record's completion, the mismatched pair whose log-ratio
enters the KL baseline ``z0 = max(0, mean over the micro-batch of log pi - log ref)``, detached.
In training the mean is over the GLOBAL micro-batch (its sum and row count summed over every
process, as TRL gathers it), so two processes with 4 records each give the z0, and the update,
of one process with 8. Evaluation runs a different number of batches on each process, so there
z0 is each process's batch mean (no collective in a loop whose length differs).
The rows go through the same collators (prefix sharing: the prompt is encoded once for both),
scorers and references as DPO's pairs, so the reference cache works for KTO too. The loss is
:func:`preftune.losses.kto`, the same function checked against TRL's on the same log-probs.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preftune.config.schema import KTOConfig
from preftune.data.inspect import label_balance_warning
from preftune.data.prepare import mismatched_pairs, prepare
from preftune.losses import UnpairedLogps, kto, split_pair
from preftune.models.load import check_vocabulary, load_policy
from preftune.stages.lifecycle import Run, open_run, record_data
from preftune.stages.pairs import pair_task, reference_strategy
from preftune.system import distributed
from preftune.system.distributed import all_sum
from preftune.training.reference import Reference
from preftune.training.task import Task


def make_loss_fn(cfg: KTOConfig, reference: Reference) -> Any:
    """(scorer, batch of KTO rows, totals) -> (the batch's share of the weighted mean loss, metrics)."""

    def loss_fn(scorer: nn.Module, batch: dict[str, Any], totals: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps, tokens = scorer(batch["input_ids"], batch["attention_mask"], batch["labels"])
        rows, ref = split_pair(logps, tokens), reference.logps(batch)
        desirable = batch["preference"] > 0.5
        out = kto(UnpairedLogps(rows.chosen, rows.chosen_tokens, desirable),
                  UnpairedLogps(ref.chosen, ref.chosen_tokens, desirable), kl=kl_baseline(rows.rejected, ref.rejected, scorer.training),
                  beta=cfg.loss.beta, desirable_weight=cfg.loss.desirable_weight, undesirable_weight=cfg.loss.undesirable_weight)
        loss = out.reduce(batch["weight"], totals["weight"].to(logps.device))
        metrics = {"rewards/chosen": out.chosen_rewards, "rewards/rejected": out.rejected_rewards, "kl": out.metrics["kl"],
                   "logps/chosen": rows.chosen[desirable].detach(), "logps/rejected": rows.chosen[~desirable].detach()}
        return loss, metrics

    return loss_fn


def kl_baseline(policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor, global_batch: bool) -> torch.Tensor:
    """KTO's KL estimate: the mean of ``log pi - log ref`` over the mismatched rows, detached.

    ``global_batch``: over the rows of every process (training: each process runs the same
    micro-batches, so the two sums below meet); else over this process's rows (evaluation).
    """
    log_ratios = (policy_kl_logps - reference_kl_logps).detach().double()
    total, rows = log_ratios.sum(), torch.tensor(float(log_ratios.shape[0]), dtype=torch.float64, device=log_ratios.device)
    if global_batch:
        total, rows = all_sum(total), all_sum(rows)
    return (total / rows).to(policy_kl_logps.dtype)


def build_task(cfg: KTOConfig, run: Run) -> Task:
    """Everything the loop needs to train ``cfg`` in ``run`` (:func:`~preftune.stages.lifecycle.open_run`);
    writes data_report.json and reference.json."""
    given = run.given
    strategy, ref_model = reference_strategy(cfg, given)
    data = prepare(cfg.data, run.tokenizer, records="unpaired", seed=cfg.train.seed, sources=given.sources(),
                   progress=cfg.train.progress, split_pairs=cfg.kto.split_pairs)
    record_data(run, data.reports, data.train, "records")
    desirable = sum(1 for item in data.train if item.desirable)
    warning = label_balance_warning(desirable, len(data.train) - desirable, cfg.loss.desirable_weight, cfg.loss.undesirable_weight)
    if warning and distributed.is_main():
        warnings.warn(f"KTO training data: {warning}", stacklevel=2)
    train_rows = mismatched_pairs(data.train, cfg.data.max_length, cfg.train.seed)
    eval_rows = mismatched_pairs(data.eval, cfg.data.max_length, cfg.train.seed + 1) if data.eval else []
    policy = load_policy(cfg.model, given.model)
    check_vocabulary(policy, train_rows + eval_rows, "data")
    return pair_task(cfg, run, given, policy, train_rows, eval_rows, lambda reference: make_loss_fn(cfg, reference),
                     strategy=strategy, ref_model=ref_model)

def run(cfg: KTOConfig) -> Path:
    """Train as ``cfg`` says; return the run folder (final model in ``final/``)."""
    with open_run(cfg) as run:
        run.train(build_task(cfg, run))
    return Path(cfg.train.output_dir)

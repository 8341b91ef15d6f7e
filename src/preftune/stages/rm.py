"""`preftune rm`: a reward model (:mod:`preftune.models.reward`) trained on preference pairs.

The objective (Ouyang et al. 2022; Bradley and Terry 1952; Eisenstein et al. 2023), each term a
mean over the optimizer step's pairs or tokens, so gradient accumulation is exact::

    loss = weighted mean of -log sigmoid(r_chosen - r_rejected - margin)     (rm_loss)
         + lm_weight * NLL per token of the chosen completions                (lm_loss)
         + center_weight * mean((r_chosen + r_rejected)^2)                     (centring)
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preftune.config.schema import RMConfig
from preftune.data.collate import collate_pairs
from preftune.data.prepare import prepare
from preftune.logprobs import IGNORE_INDEX
from preftune.losses import bradley_terry, sft_nll
from preftune.models.load import check_vocabulary, load_policy
from preftune.models.reward import RewardModel, save_reward_model
from preftune.stages.lifecycle import Run, open_run, record_data, write_config
from preftune.training.task import Task


def count_pairs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The reward model's denominators: pair weights, pairs, and scored chosen tokens."""
    pairs = batch["weight"].shape[0]
    return {"weight": batch["weight"].sum(), "pairs": torch.tensor(float(pairs)),
            "chosen_tokens": (batch["labels"][:pairs] != IGNORE_INDEX).sum()}


def make_rm_loss(cfg: RMConfig) -> Any:
    """The loop's loss function: (model, concatenated pair batch, totals) -> (the batch's share of
    the step's loss, per-pair metrics: rm_loss, lm_loss, accuracy, margin, rewards)."""
    lm_weight, center_weight, use_margin = cfg.loss.lm_weight, cfg.loss.center_weight, cfg.loss.use_margin

    def loss_fn(model: nn.Module, batch: dict[str, Any], totals: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pairs = batch["weight"].shape[0]
        # The LM loss is on chosen completions only: rejected rows are not projected at all. It
        # is logged even at lm_weight 0, so runs with and without it compare on the same number.
        labels = batch["labels"].clone()
        labels[pairs:] = IGNORE_INDEX
        rewards, logps, tokens = model(batch["input_ids"], batch["attention_mask"], labels)
        chosen, rejected = rewards[:pairs], rewards[pairs:]
        rm_loss = bradley_terry(chosen, rejected, margin=batch["margin"] if use_margin else None)
        weight = batch["weight"]
        device = rewards.device
        loss = (rm_loss * weight).sum() / totals["weight"].to(device)
        metrics = {"rm_loss": rm_loss.detach(), "accuracy": (chosen > rejected).float().detach(),
                   "margin": (chosen - rejected).detach(), "rewards/chosen": chosen.detach(), "rewards/rejected": rejected.detach()}
        if lm_weight > 0:
            loss = loss + lm_weight * sft_nll(logps[:pairs], tokens[:pairs], total_tokens=totals["chosen_tokens"].to(device))
        metrics["lm_loss"] = (-logps[:pairs] / tokens[:pairs].clamp(min=1)).detach()
        if center_weight > 0:
            loss = loss + center_weight * ((chosen + rejected) ** 2).sum() / totals["pairs"].to(device)
        return loss, metrics

    return loss_fn


def build_task(cfg: RMConfig, run: Run) -> Task:
    """Everything the loop needs to train ``cfg`` in ``run`` (:func:`~preftune.stages.lifecycle.open_run`);
    writes data_report.json. ``run.given`` holds what a Python caller passed in memory (the backbone, tokenizer, data)."""
    given = run.given
    data = prepare(cfg.data, run.tokenizer, records="pairs", seed=cfg.train.seed, sources=given.sources(),
                   progress=cfg.train.progress)  # as DPO
    record_data(run, data.reports, data.train, "pairs")
    model = RewardModel(load_policy(cfg.model, given.model), chunk_size=cfg.train.logprob_chunk_size)
    check_vocabulary(model.lm, data.train + data.eval, "data")
    run.decide(model, len(data.train))

    def save_final(folder: Path, seq_cls: bool = True, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        save_reward_model(model, run.tokenizer, folder, seq_cls=seq_cls, state_dict=state_dict)
        write_config(run, folder)

    return Task(model=model, loss_fn=make_rm_loss(cfg), train_set=data.train,
                collate=partial(collate_pairs, pad_token_id=run.tokenizer.pad_token_id),
                lengths=[p.length for p in data.train], counts=count_pairs, eval_set=data.eval, save_final=save_final,
                save_model=lambda folder, state_dict=None: save_final(folder, seq_cls=False, state_dict=state_dict),
                group_by_length=cfg.data.group_by_length, output=model)


def run(cfg: RMConfig) -> Path:
    """Train a reward model as ``cfg`` says; return the run folder (model in ``final/``)."""
    with open_run(cfg) as run:
        run.train(build_task(cfg, run))
    return Path(cfg.train.output_dir)

"""`preftune sft`: supervised fine-tuning on completions, on the one training loop.

Data: prompt/completion records, chats (``messages``: the last assistant turn is the
completion), or preference data (the chosen side). The loss is the next-token NLL per completion
token (prompt tokens are masked; :func:`preftune.losses.sft_nll`), computed with the same
chunked log-prob code as DPO, and averaged over the optimizer step's tokens, so gradient
accumulation is exact. As TRL, it logs ``entropy`` (of the next-token distribution) and
``mean_token_accuracy`` (the label is the argmax), means over completion tokens. With ``sft.packing`` several short examples share a row: positions
restart for each and a block-diagonal attention mask keeps them from seeing each other, so the
loss is exactly the unpacked one.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preftune.config.schema import SFTConfig
from preftune.data.collate import collate_packed, collate_unpaired, pack
from preftune.data.prepare import prepare
from preftune.errors import DataError
from preftune.logprobs import IGNORE_INDEX
from preftune.losses import sft_nll
from preftune.models.load import check_vocabulary, load_policy
from preftune.models.scorers import SequenceLogpsWithStats
from preftune.stages.lifecycle import Run, open_run, policy_saver, record_data
from preftune.training.task import Task


def count_tokens(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """SFT's loss is a mean over scored (completion) tokens."""
    return {"tokens": (batch["labels"] != IGNORE_INDEX).sum()}


def sft_loss(scorer: nn.Module, batch: dict[str, Any], totals: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The batch's share of the step's per-token NLL; per-row NLL and token counts for the log."""
    logps, tokens, entropy, hits = scorer(batch["input_ids"], batch["attention_mask"], batch["labels"], batch.get("position_ids"))
    loss = sft_nll(logps, tokens, total_tokens=totals["tokens"])
    per_row = -logps / tokens.clamp(min=1)
    # TRL's token means: each row's mean repeated once per token, so the log's mean weighs tokens, not rows
    per_token = {name: torch.repeat_interleave(values / tokens.clamp(min=1), tokens) for name, values in
                 (("entropy", entropy), ("mean_token_accuracy", hits))}
    return loss, {"nll": per_row.detach(), "tokens": tokens.float().detach(), **per_token}


def build_task(cfg: SFTConfig, run: Run) -> Task:
    """Everything the loop needs to train ``cfg`` in ``run`` (:func:`~preftune.stages.lifecycle.open_run`);
    writes data_report.json. ``run.given`` holds what a Python caller passed in memory (model, tokenizer, data)."""
    given = run.given
    data = prepare(cfg.data, run.tokenizer, records="demonstrations", seed=cfg.train.seed, sources=given.sources(),
                   progress=cfg.train.progress)
    record_data(run, data.reports, data.train, "examples")
    weighted = next((x for x in data.train + data.eval if x.weight != 1.0), None)
    if weighted is not None:  # a token mean has no per-record weight: never ignore the field silently
        raise DataError(f"{weighted.source}: field 'weight' is {weighted.weight}; SFT's loss is a mean over tokens and takes no "
                        "per-record weight (remove the field, or train with dpo, kto or rm, which honour it)")

    policy = load_policy(cfg.model, given.model)
    scorer = SequenceLogpsWithStats(policy, chunk_size=cfg.train.logprob_chunk_size)
    pad = run.tokenizer.pad_token_id
    if cfg.sft.packing:
        dtype = next(policy.parameters()).dtype
        train_items: list[Any] = pack(data.train, cfg.data.max_length)
        eval_items: list[Any] = pack(data.eval, cfg.data.max_length) if data.eval else []
        collate = partial(collate_packed, pad_token_id=pad, dtype=dtype)
        lengths = [sum(x.length for x in row) for row in train_items]
    else:
        train_items, eval_items = data.train, data.eval  # compact: each item is built when its batch is
        collate = partial(collate_unpaired, pad_token_id=pad)
        lengths = [x.length for x in data.train]
    check_vocabulary(policy, train_items + eval_items, "data")
    run.decide(scorer, len(train_items))
    return Task(model=scorer, loss_fn=sft_loss, train_set=train_items, collate=collate, lengths=lengths, counts=count_tokens,
                eval_set=eval_items, save_final=policy_saver(run, policy), group_by_length=cfg.data.group_by_length, output=policy)


def run(cfg: SFTConfig) -> Path:
    """Train as ``cfg`` says; return the run folder (final model in ``final/``)."""
    with open_run(cfg) as run:
        run.train(build_task(cfg, run))
    return Path(cfg.train.output_dir)

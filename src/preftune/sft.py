"""`preftune sft`: supervised fine-tuning on completions, on the one training loop.

Data: prompt/completion records, chats (``messages``: the last assistant turn is the
completion), or preference data (the chosen side). The loss is the mean next-token NLL over
completion tokens (prompt tokens are masked), computed with the same chunked log-prob code as
DPO. With ``sft.packing`` several short examples share a row: positions restart for each and a
block-diagonal attention mask keeps them from seeing each other, so the loss is exactly the
unpacked one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preftune.config import SFTConfig, to_yaml
from preftune.data.records import DataReport, PreferenceExample, TokenizedUnpaired, UnpairedExample
from preftune.errors import PreftuneError


def as_demonstrations(examples: Sequence[PreferenceExample | UnpairedExample], report: DataReport) -> list[UnpairedExample]:
    """SFT examples: preference pairs give their chosen side; undesirable unpaired records are
    left out and counted (``dropped['undesirable']``)."""
    out: list[UnpairedExample] = []
    for ex in examples:
        if isinstance(ex, PreferenceExample):
            out.append(UnpairedExample(prompt=ex.prompt, completion=ex.chosen, desirable=True, system=ex.system,
                                       weight=ex.weight, source=ex.source))
        elif ex.desirable:
            out.append(ex)
        else:
            report.dropped["undesirable"] = report.dropped.get("undesirable", 0) + 1
            report.kept -= 1
    return out


def prepare_sft_data(cfg: SFTConfig, tokenizer: Any) -> tuple[list[TokenizedUnpaired], list[TokenizedUnpaired], dict[str, Any]]:
    """Load, validate, tokenize; split off eval data when no eval files are given."""
    from preftune.data import load_examples
    from preftune.data.tokenize import tokenize_unpaired
    from preftune.dpo import split_eval

    if not cfg.data.train:
        raise PreftuneError("no training data: set data.train to one or more files.")
    reports: dict[str, Any] = {}
    tokenized: dict[str, list[TokenizedUnpaired]] = {}
    for split, paths in (("train", cfg.data.train), ("eval", cfg.data.eval)):
        if not paths:
            tokenized[split] = []
            continue
        result = load_examples(paths, format=cfg.data.format, columns=cfg.data.columns or None,
                               on_error=cfg.data.on_error, system=cfg.data.system, max_records=cfg.data.max_records)
        demos = as_demonstrations(result.examples, result.report)
        tokenized[split] = tokenize_unpaired(demos, tokenizer, max_length=cfg.data.max_length,
                                             max_prompt_length=cfg.data.max_prompt_length,
                                             on_overflow=cfg.data.on_overflow, report=result.report)
        reports[split] = dataclasses.asdict(result.report)
    train, held = tokenized["train"], tokenized["eval"]
    if not held and cfg.data.eval_fraction > 0:
        train, held = split_eval(train, cfg.data.eval_fraction, cfg.train.seed)
    return train, held, reports


def pack(items: Sequence[TokenizedUnpaired], max_length: int) -> list[list[TokenizedUnpaired]]:
    """Greedy first-fit-decreasing packing of examples into rows of at most ``max_length`` tokens.

    Deterministic (ties keep input order). An example longer than ``max_length`` cannot exist
    here: tokenization already fitted every example.
    """
    order = sorted(range(len(items)), key=lambda i: -items[i].length)
    bins: list[list[TokenizedUnpaired]] = []
    room: list[int] = []
    for i in order:
        n = items[i].length
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(items[i])
                room[b] -= n
                break
        else:
            bins.append([items[i]])
            room.append(max_length - n)
    return bins


def collate_packed(packs: list[list[TokenizedUnpaired]], pad_token_id: int, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Rows of packed examples: ``input_ids``, ``labels`` (-100 on prompts and padding),
    ``position_ids`` restarting per example, and a 4D additive attention mask (0 = attend,
    dtype-min = blocked) that is causal within each example and blocks everything across."""
    from preftune.data.collate import IGNORE_INDEX

    width = max(sum(x.length for x in row) for row in packs)
    rows = len(packs)
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((rows, width), dtype=torch.long)
    segment = torch.full((rows, width), -1, dtype=torch.long)
    for r, row in enumerate(packs):
        start = 0
        for s, item in enumerate(row):
            if not item.prompt_ids:
                # the first completion token would be predicted from the previous example
                raise PreftuneError(f"packing needs a non-empty prompt (record {item.source}); set sft.packing=false")
            ids = item.prompt_ids + item.completion_ids
            end = start + len(ids)
            input_ids[r, start:end] = torch.tensor(ids)
            labels[r, start + len(item.prompt_ids):end] = torch.tensor(item.completion_ids)
            position_ids[r, start:end] = torch.arange(len(ids))
            segment[r, start:end] = s
            start = end
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    allowed = causal & (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    allowed |= torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves: no all-blocked row (NaN)
    mask = torch.zeros((rows, 1, width, width), dtype=dtype).masked_fill(~allowed[:, None], torch.finfo(dtype).min)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "position_ids": position_ids,
            "weight": torch.ones(rows), "examples": torch.tensor([len(row) for row in packs]),
            "real_tokens": torch.tensor([sum(x.length for x in row) for row in packs])}


def sft_loss(scorer: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean NLL per completion token over the micro-batch; per-row metrics for the log."""
    logps, tokens = scorer(batch["input_ids"], batch["attention_mask"], batch["labels"], batch.get("position_ids"))
    total = tokens.sum().clamp(min=1)
    loss = -logps.sum() / total
    per_row = -logps / tokens.clamp(min=1)
    return loss, {"nll": per_row.detach(), "tokens": tokens.float().detach()}


def run_sft(cfg: SFTConfig) -> Path:
    """Train as ``cfg`` says; return the run folder (final model in ``final/``)."""
    from preftune.data.collate import collate_unpaired
    from preftune.dpo import save_policy
    from preftune.models import SequenceLogps, load_policy, load_tokenizer
    from preftune.train import Task, fit, seed_everything

    run_dir = Path(cfg.train.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    seed_everything(cfg.train.seed, deterministic=cfg.train.deterministic)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    train, held, reports = prepare_sft_data(cfg, tokenizer)
    if not train:
        raise PreftuneError("no training examples are left after loading and truncation; see data_report.json.")
    (run_dir / "data_report.json").write_text(json.dumps(reports, indent=1), encoding="utf-8")

    policy = load_policy(cfg.model)
    scorer = SequenceLogps(policy, chunk_size=cfg.train.logprob_chunk_size)
    if cfg.sft.packing:
        dtype = next(policy.parameters()).dtype
        train_items: list[Any] = pack(train, cfg.data.max_length)
        eval_items: list[Any] = pack(held, cfg.data.max_length) if held else []
        collate = partial(collate_packed, pad_token_id=tokenizer.pad_token_id, dtype=dtype)
        lengths = [sum(x.length for x in row) for row in train_items]
    else:
        train_items, eval_items = list(train), list(held)
        collate = partial(collate_unpaired, pad_token_id=tokenizer.pad_token_id)
        lengths = [x.length for x in train]

    def save_final(folder: Path) -> None:
        save_policy(policy, tokenizer, folder, merge=cfg.model.lora.merge_on_save)
        (folder / "preftune_config.yaml").write_text(to_yaml(cfg), encoding="utf-8")

    task = Task(model=scorer, loss_fn=sft_loss, train_set=train_items, collate=collate, lengths=lengths,
                eval_set=eval_items, save_final=save_final, group_by_length=cfg.data.group_by_length)
    fit(task, cfg.train, run_dir)
    return run_dir

"""One process, one or more preftune runs (``python -m benchmarks.run_preftune ...``; bench.py calls it).

Each run trains with preftune's own pieces and its one loop, ``preftune.train.fit``: the data
path (``prepare_pairs``), the collators, the scorers, the references, ``make_loss_fn``. A run
name picks which speed and memory work is on (``VARIANTS``), so each is measured on its own.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import VARIANTS, Settings, StepClock, Variant, batch_order, child_main, real_tokens, result
from preftune.logprobs import naive_completion_logps


class FullLogitsLogps(nn.Module):
    """The textbook scorer: the model's full logits, log_softmax in fp32, then gather (the baseline)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
        return naive_completion_logps(logits, labels)


def dpo_config(settings: Settings, variant: Variant, model_dir: Path, records: Path, run_dir: Path) -> Any:
    from preftune.config import DataConfig, DPOConfig, LoraConfig, LossConfig, ModelConfig, ReferenceConfig, TrainConfig

    lora = LoraConfig(enabled=variant.lora, r=settings.lora_r, alpha=settings.lora_alpha, target_modules=list(settings.lora_targets))
    return DPOConfig(
        model=ModelConfig(path=str(model_dir), dtype="float32", lora=lora, gradient_checkpointing=variant.checkpointing),
        data=DataConfig(train=[str(records)], max_length=settings.max_length, max_prompt_length=settings.max_length,
                        group_by_length=variant.order == "grouped"),
        loss=LossConfig(name="dpo", beta=settings.beta),
        reference=ReferenceConfig(strategy="adapter" if variant.reference == "adapter" else "copy"),
        train=TrainConfig(output_dir=str(run_dir), seed=settings.seed, max_steps=settings.total_steps, batch_size=settings.batch_size,
                          lr=settings.lr, scheduler="constant", warmup_steps=0, max_grad_norm=1.0, log_every=1, progress=False),
    )


def build_reference(cfg: Any, variant: Variant, scorer: Any, train: list, cache_dir: Path, pad_id: int) -> tuple[Any, dict]:
    """The reference for this variant, and what building it cost (the cache pass when cold)."""
    from preftune.data.collate import collate_pairs
    from preftune.dpo import TOKENIZER_FILES, WEIGHT_FILES
    from preftune.models import SequenceLogps, freeze, load_causal_lm
    from preftune.prefix import SharedPrefixLogps, collate_prefix_shared
    from preftune.reference import (
        AdapterOffReference, FrozenCopyReference, cache_key, hash_files, hash_pairs, load_or_compute_cache,
    )

    if variant.reference == "adapter":
        return AdapterOffReference(scorer), {}
    frozen = freeze(load_causal_lm(cfg.model)) if variant.reference == "copy" else None
    if variant.reference == "copy":
        if variant.logps == "full":
            return FrozenCopyReference(FullLogitsLogps(frozen)), {}
        cls = SharedPrefixLogps if variant.layout == "shared" else SequenceLogps
        return FrozenCopyReference(cls(frozen, chunk_size=cfg.train.logprob_chunk_size)), {}
    key = cache_key(model_hash=hash_files(cfg.model.path, WEIGHT_FILES), tokenizer_hash=hash_files(cfg.model.path, TOKENIZER_FILES),
                    data_hash=hash_pairs(train), precision=cfg.model.dtype)
    path = cache_dir / f"{key}.safetensors"
    if variant.reference == "cache-cold" and path.exists():
        path.unlink()  # cold means cold: this run pays for the reference pass
    # The cache pass is a reference forward over the whole set: prefix sharing speeds it up too.
    shared = variant.layout == "shared"
    cls = SharedPrefixLogps if shared else SequenceLogps
    started = time.perf_counter()
    reference, warm = load_or_compute_cache(
        cache_dir=cache_dir, key=key, pairs=train,
        scorer_factory=lambda: cls(freeze(load_causal_lm(cfg.model)), chunk_size=cfg.train.logprob_chunk_size),
        collate=partial(collate_prefix_shared if shared else collate_pairs, pad_token_id=pad_id),
        batch_size=cfg.train.batch_size, device=torch.device("cpu"), autocast=nullcontext,
    )
    seconds = time.perf_counter() - started
    if warm != (variant.reference == "cache-warm"):
        raise RuntimeError(f"{variant.reference}: the cache was {'warm' if warm else 'cold'}; run cache-cold before cache-warm")
    return reference, {"cache_seconds": seconds, "cache_warm": warm, "cache_pairs": len(train),
                       "cache_tokens": sum(real_tokens(p) for p in train)}


def prepare(settings: Settings, variant: Variant, model_dir: Path, records: Path, run_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """Everything ``fit`` needs, built as preftune builds it; plus what the measurement needs."""
    from preftune.data.collate import collate_pairs
    from preftune.dpo import make_loss_fn, prepare_pairs
    from preftune.models import SequenceLogps, load_policy, load_tokenizer
    from preftune.prefix import SharedPrefixLogps, collate_prefix_shared
    from preftune.train import seed_everything

    cfg = dpo_config(settings, variant, model_dir, records, run_dir)
    seed_everything(settings.seed)
    tokenizer = load_tokenizer(str(model_dir))
    train, _, reports = prepare_pairs(cfg, tokenizer)
    if reports["train"]["kept"] != reports["train"]["records"] or any(reports["train"]["truncation"].values()):
        raise RuntimeError(f"the fixture lost records in tokenization: {reports['train']}")
    policy = load_policy(cfg.model)
    if variant.logps == "full":
        scorer = FullLogitsLogps(policy)
    else:
        scorer = (SharedPrefixLogps if variant.layout == "shared" else SequenceLogps)(policy, chunk_size=cfg.train.logprob_chunk_size)
    reference, reference_cost = build_reference(cfg, variant, scorer, train, cache_dir, tokenizer.pad_token_id)
    collate = collate_prefix_shared if variant.layout == "shared" else collate_pairs
    # The shared row is prompt + chosen + rejected long: group by that length.
    if variant.layout == "shared":
        lengths = [p.shared_length for p in train]
    else:
        lengths = [p.length for p in train]
    return {"cfg": cfg, "train": train, "scorer": scorer, "loss_fn": make_loss_fn(cfg, reference),
            "collate": partial(collate, pad_token_id=tokenizer.pad_token_id), "lengths": lengths, "reference_cost": reference_cost}


@contextmanager
def unfused_adamw(enabled: bool) -> Iterator[None]:
    """Measure what preftune's fused AdamW buys: this run gets the single-tensor one.

    The single-tensor AdamW runs ~10 elementwise kernels per parameter tensor; the fused one runs
    one. On a CPU whose other cores are busy, every parallel kernel can wait a scheduler time
    slice for its second thread, so the kernel count, not the arithmetic, sets the cost.
    """
    import preftune.train as loop

    original = loop._can_fuse
    if enabled:
        loop._can_fuse = lambda params: False
    try:
        yield
    finally:
        loop._can_fuse = original


def run_one(name: str, settings: Settings, fixtures: Path, workdir: Path, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train one variant for warm-up + timed steps; return its JSON record."""
    from preftune.train import Task, fit

    from benchmarks.fixtures import Fixtures

    variant = VARIANTS[name]
    fx = Fixtures(fixtures)
    model_dir, records = fx.model(settings.model), fx.records(settings.smoke)
    run_dir = workdir / f"preftune-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    parts = prepare(settings, variant, model_dir, records, run_dir, workdir / "reference-cache")
    train = parts["train"]
    clock = StepClock()
    consumed: list[list[int]] = []

    def timed_collate(items: list) -> dict:
        # fit collates a step's batch first thing: the call for step k+1 marks the end of step k.
        clock.mark(len(consumed))
        if on_step is not None:
            on_step(len(consumed))
        consumed.append([p.index for p in items])
        return parts["collate"](items)

    task = Task(model=parts["scorer"], loss_fn=parts["loss_fn"], train_set=train, collate=timed_collate,
                lengths=parts["lengths"], group_by_length=variant.order == "grouped")
    with unfused_adamw(variant.unfused_adam):
        fit(task, parts["cfg"].train, run_dir)
    clock.mark(len(consumed))

    expected = batch_order(len(train), parts["lengths"], settings, grouped=variant.order == "grouped")[: settings.total_steps]
    if consumed != expected:
        raise RuntimeError(f"{name}: fit ran other batches than the benchmark's order")
    timed = [train[i] for batch in consumed[settings.warmup_steps :] for i in batch]
    tokens = sum(real_tokens(p) for p in timed)
    seconds = clock.timed_seconds(settings)
    cost = parts["reference_cost"]
    reference_tokens = 0 if variant.reference.startswith("cache") else tokens
    extra: dict[str, Any] = {"variant": variant.__dict__, **cost}
    if variant.reference == "cache-cold":
        # The reference pass covers one epoch; charge the timed steps their share of it.
        share = len(timed) / cost["cache_pairs"]
        seconds += cost["cache_seconds"] * share
        reference_tokens = tokens
        extra["cache_charged_seconds"] = cost["cache_seconds"] * share
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    metrics = {key: [line[key] for line in steps] for key in ("rewards/margins", "logps/chosen", "logps/rejected")}
    return result(run=name, framework="preftune", settings=settings, model_dir=model_dir, seconds=seconds, tokens=tokens,
                  reference_tokens=reference_tokens, losses=[line["loss"] for line in steps], metrics=metrics, extra=extra)


def main() -> None:
    child_main(run_one, __doc__)


if __name__ == "__main__":
    main()

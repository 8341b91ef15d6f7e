"""Where reference log-probs come from.

- ``copy``: a frozen copy of the reference model (eval mode, no grads, dropout off);
- ``adapter``: with LoRA, the base model with the adapter off: the policy's own weights, no
  second copy in memory. With ``auto`` this is chosen only when it is the model as the run starts
  (a fresh adapter, every ``lora_B`` zero); a trained adapter (SFT-LoRA, then DPO) is scored
  through a frozen copy of itself instead (:mod:`preftune.models.adapters`), as TRL does. Asked
  for explicitly with a trained adapter, it is the base model, with a warning;
- ``cache``: computed once before training, stored on disk, and looked up by example index.
  The file name is a hash of the reference weights, the tokenized data, the tokenizer and the
  precision, so a change to any of them gives a new key: a stale cache is never read. Runs and
  sweeps over beta or the loss reuse it;
- ``none``: reference-free losses (SimPO, ORPO).

:func:`build_reference` turns a config's ``reference`` section into the references a stage uses.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preftune.config.schema import DPOConfig
from preftune.errors import PreftuneError
from preftune.losses import PairLogps, needs_reference, split_pair
from preftune.models.adapters import adapter_is_zero, add_reference_adapter, using_adapter
from preftune.models.compiled import compile_layers
from preftune.models.load import freeze, load_causal_lm
from preftune.models.scorers import SequenceLogps
from preftune.models.tokenizer import check_folder
from preftune.system.distributed import all_gather, barrier, is_main, world
from preftune.system.files import atomic_write
from preftune.system.progress import batches

CACHE_VERSION = 1


class Reference:
    """Base: ``logps(batch)`` gives the reference's PairLogps for a collated batch, or None."""

    def logps(self, batch: dict[str, Any]) -> PairLogps | None:
        return None


class FrozenCopyReference(Reference):
    """A separate, frozen reference model (wrapped in a scorer of :mod:`preftune.models.scorers`)."""

    def __init__(self, scorer: nn.Module) -> None:
        self.scorer = scorer

    def logps(self, batch: dict[str, Any]) -> PairLogps:
        with torch.no_grad():
            logps, tokens = self.scorer(batch["input_ids"], batch["attention_mask"], batch["labels"])
        return split_pair(logps, tokens)


class ReferenceSync:
    """TR-DPO (Gorbatovski et al. 2024, arXiv:2404.09656, eqs. 5-6): every ``steps`` optimizer steps the frozen
    copy moves towards the policy, ``ref <- alpha * policy + (1 - alpha) * ref`` (soft update), or is replaced by
    it (``alpha = 1``, hard update). Called by the loop on every process after the step (:attr:`Task.after_step`),
    so the next forward reads the new reference. Only a frozen copy can move: a cache holds the start's
    log-probs, and the adapter-off reference is the policy's own base weights."""

    def __init__(self, policy: nn.Module, reference: nn.Module, *, alpha: float, steps: int) -> None:
        self.pairs = list(zip(policy.parameters(), reference.parameters(), strict=True))
        self.alpha, self.steps = alpha, steps

    def __call__(self, step: int) -> None:
        if step % self.steps:
            return
        with torch.no_grad():
            for source, target in self.pairs:
                target.lerp_(source.detach().to(target.dtype), self.alpha)  # target + alpha (source - target)


def sync_problem(strategy: str) -> str | None:
    """Why TR-DPO's reference syncing cannot run with reference ``strategy``, or None."""
    if strategy == "cache":
        return ("reference.sync_ref_model needs reference.strategy=copy: a cache holds the log-probs of the reference as the "
                "run starts, and a synced reference changes during the run")
    if strategy == "adapter":
        return ("reference.sync_ref_model needs reference.strategy=copy: with LoRA the reference is the policy's own base weights "
                "(the adapter switched off), so there is no separate copy to move")
    if strategy == "none":
        return "reference.sync_ref_model needs a reference: the loss is reference-free"
    return None


class AdapterOffReference(Reference):
    """The LoRA policy with its adapter disabled (the base weights, shared, not copied), or, with
    ``adapter``, scored through that other (frozen) adapter of the policy."""

    def __init__(self, scorer: nn.Module, adapter: str | None = None) -> None:
        self.scorer = scorer  # SequenceLogps around the peft model
        self.adapter = adapter

    def logps(self, batch: dict[str, Any]) -> PairLogps:
        peft_model = self.scorer.model
        was_training = peft_model.training
        peft_model.eval()  # dropout off, as for a frozen copy
        switch = peft_model.disable_adapter() if self.adapter is None else using_adapter(peft_model, self.adapter)
        try:
            with torch.no_grad(), switch:
                logps, tokens = self.scorer(batch["input_ids"], batch["attention_mask"], batch["labels"])
        finally:
            peft_model.train(was_training)
        return split_pair(logps, tokens)


class CachedReference(Reference):
    """Reference log-probs read from a table computed once, by example index."""

    def __init__(self, table: dict[str, torch.Tensor], path: Path | None = None) -> None:
        self.table = table
        self.path = path

    def logps(self, batch: dict[str, Any]) -> PairLogps:
        index = batch["index"].cpu()
        device = batch["input_ids"].device
        return PairLogps(*(self.table[name][index].to(device) for name in ("chosen", "rejected", "chosen_tokens", "rejected_tokens")))


# --------------------------------------------------------------------------- cache keys
def hash_files(folder: str | Path, patterns: Sequence[str]) -> str:
    """sha256 over the named files of a folder (names and bytes, in sorted order)."""
    digest = hashlib.sha256()
    folder = Path(folder)
    files = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
    if not files:
        raise PreftuneError(f"nothing to hash in '{folder}' (looked for {', '.join(patterns)}).")
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def hash_pairs(pairs: Sequence[Any]) -> str:
    """sha256 of the tokenized data: every pair's prompt, chosen and rejected ids, in order."""
    digest = hashlib.sha256()
    for pair in pairs:
        for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            digest.update(len(ids).to_bytes(4, "little"))
            digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()


def hash_module(model: nn.Module) -> str:
    """sha256 over a model in memory: its class, config, and every parameter and buffer's name and bytes."""
    digest = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        digest.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def hash_tokenizer(tokenizer: Any) -> str:
    """sha256 over a tokenizer in memory: its vocabulary and rules, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True),
             json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str), str(getattr(tokenizer, "chat_template", None))]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def cache_key(*, model_hash: str, tokenizer_hash: str, data_hash: str, precision: str) -> str:
    parts = json.dumps(
        {"v": CACHE_VERSION, "model": model_hash, "tokenizer": tokenizer_hash, "data": data_hash, "precision": precision},
        sort_keys=True,
    )
    return hashlib.sha256(parts.encode()).hexdigest()[:32]


def load_or_compute_cache(
    *,
    cache_dir: str | Path,
    key: str,
    pairs: Sequence[Any],
    scorer_factory: Callable[[], nn.Module],
    collate: Callable[[list[Any]], dict[str, Any]],
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], Any],
    progress: bool = False,
) -> tuple[CachedReference, bool]:
    """The cached table for ``key``; computed (and written atomically) when absent.

    Returns the reference and whether it was read from disk (a warm cache). With several
    processes each scores every n-th batch, the rows are gathered on every process, and the main
    process writes the file once.
    """
    from safetensors.torch import load_file, save_file

    path = Path(cache_dir).expanduser() / f"{key}.safetensors"
    if path.is_file():
        table = load_file(str(path))
        if table["chosen"].shape[0] == len(pairs):
            return CachedReference(table, path), True
        # Same key with another size cannot happen unless the file was tampered with.
        raise PreftuneError(f"reference cache '{path}' holds {table['chosen'].shape[0]} rows for {len(pairs)} examples; delete it.")
    # Rows are stored by dataset index, which is the order of `pairs` by construction.
    if [pair.index for pair in pairs] != list(range(len(pairs))):
        raise PreftuneError("internal: tokenized pairs are not in index order; cannot cache reference log-probs.")
    scorer = scorer_factory()
    # Scored in order of length, so each batch holds similar lengths and little padding is computed.
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].shared_length)
    columns: dict[str, list[torch.Tensor]] = {"chosen": [], "rejected": [], "chosen_tokens": [], "rejected_tokens": []}
    rank, processes = world()
    scored: list[int] = []  # positions in `order` this process scored
    with torch.no_grad():
        for number, start in enumerate(batches(len(pairs), batch_size, desc="reference cache", enabled=progress and rank == 0)):
            if number % processes != rank:
                continue
            scored.extend(order[start : start + batch_size])
            batch = collate([pairs[i] for i in order[start : start + batch_size]])
            with autocast():
                logps, tokens = scorer(batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["labels"].to(device))
            pair = split_pair(logps.float().cpu(), tokens.cpu())
            for name in columns:
                columns[name].append(getattr(pair, name))
    local = {name: torch.cat(values) if values else torch.empty(0) for name, values in columns.items()}
    parts = all_gather((scored, local))
    where = torch.tensor([i for indices, _ in parts for i in indices])
    table = {}
    for name in columns:
        values = torch.cat([part[name] for _, part in parts if len(part[name])])
        table[name] = torch.empty_like(values).index_copy_(0, where, values)
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in table.items()}, str(tmp),
                                                 metadata={"key": key, "rows": str(len(pairs))}))
    barrier()
    del scorer
    return CachedReference(table, path), False


# --------------------------------------------------------------------------- building the reference
#: The files whose bytes key a cached reference: the weights, and the tokenizer.
WEIGHT_FILES = ("*.safetensors", "config.json")
TOKENIZER_FILES = ("tokenizer*.json", "special_tokens_map.json", "chat_template.*", "*.model", "vocab*", "merges.txt")


def resolve_reference_strategy(cfg: DPOConfig, *, adapter: bool | None = None, given_reference: bool = False) -> str:
    """``auto`` -> ``none`` for reference-free losses, ``copy`` when a reference model is given,
    ``adapter`` with LoRA (``adapter``: the policy carries one; default ``model.lora.enabled``),
    else ``copy``."""
    strategy = cfg.reference.strategy
    reference_free = not needs_reference(cfg.loss.name)
    adapter = cfg.model.lora.enabled if adapter is None else adapter
    if strategy == "auto":
        if reference_free:
            return "none"
        return "adapter" if adapter and not given_reference else "copy"
    if strategy == "none" and not reference_free:
        raise PreftuneError(f"loss '{cfg.loss.name}' needs a reference model: set reference.strategy to copy, adapter or cache.")
    if strategy == "adapter" and given_reference:
        raise PreftuneError("reference.strategy=adapter uses the policy's own base weights; a reference model was given as well.")
    if strategy == "adapter" and not adapter:
        raise PreftuneError("reference.strategy=adapter needs LoRA (model.lora.enabled=true): without an adapter there is nothing to switch off.")
    if strategy == "adapter" and cfg.reference.path not in (None, cfg.model.path):
        raise PreftuneError("reference.strategy=adapter uses the policy's own base weights; reference.path must be unset.")
    return strategy


def adapter_reference(cfg: DPOConfig, policy_scorer: nn.Module, info: dict[str, Any]) -> AdapterOffReference:
    """The LoRA policy's reference: its adapter off when that is the model as it starts (a zero
    adapter) or when ``reference.strategy=adapter`` asks for it (warned when the adapter is not
    zero); else a frozen copy of the trained adapter. ``info`` records which."""
    peft_model = policy_scorer.model
    if adapter_is_zero(peft_model):
        info["adapter"] = "off (a zero adapter: the model as it starts)"
        return AdapterOffReference(policy_scorer)
    if cfg.reference.strategy == "adapter":
        warnings.warn("reference.strategy=adapter is the base model with the adapter off, but this adapter is trained "
                      "(not zero): the reference is not the model as it starts (TRL's reference is). Leave "
                      "reference.strategy=auto for a frozen copy of the adapter.", stacklevel=2)
        info["adapter"] = "off (a trained adapter: the base model, as reference.strategy=adapter asked)"
        return AdapterOffReference(policy_scorer)
    name = add_reference_adapter(peft_model)
    if is_main():
        print(f"preftune: the LoRA adapter is trained (not zero): the reference is a frozen copy of it ('{name}'), "
              "the model as it starts", file=sys.stderr)
    info["adapter"] = f"frozen copy of the trained adapter ('{name}')"
    return AdapterOffReference(policy_scorer, name)


def layer_matrices_to_bf16(model: nn.Module) -> nn.Module:
    """Store the linear maps of ``model``'s decoder layers in bf16 (in place): a frozen reference that
    only ever runs under bf16 autocast, which casts those weights to bf16 for every matmul anyway, so
    its log-probs are bitwise the same (tested) in half the bytes. Embeddings, norms and the head keep
    their dtype (they are not autocast ops; the head runs in :mod:`preftune.logprobs`'s own precision)."""
    from preftune.training.sharding import decoder_layers

    for layer in decoder_layers(model):
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                module.to(torch.bfloat16)
    return model


def build_reference(cfg: DPOConfig, strategy: str, policy_scorer: nn.Module, train: Sequence[Any],
                    held: Sequence[Any], collate: Callable, device: torch.device,
                    scorer_cls: type[nn.Module] | None = None, *, ref_model: nn.Module | None = None,
                    tokenizer: Any = None, compile: bool = False, bf16: bool = False) -> tuple[Reference, Reference, dict[str, Any]]:
    """The reference for the train and eval sets (the same object unless cached).

    ``scorer_cls`` scores ``collate``'s batches (``SequenceLogps`` or ``SharedPrefixLogps``).
    ``ref_model`` is a reference already in memory (the Python API's): frozen and used as is,
    and for the cache keyed by a hash of its weights; ``tokenizer``, when given, keys the cache
    by its content instead of the tokenizer folder's files. ``compile``: the run's resolved
    ``train.compile`` (:mod:`preftune.training.compile_choice`), applied to a reference copy's decoder layers;
    ``bf16``: the run's resolved ``train.bf16`` (:mod:`preftune.training.precision`), the precision the cache
    pass runs in and its key records; a reference copy loaded here then holds its layers' matrices in
    bf16 (:func:`layer_matrices_to_bf16`).
    """
    scorer_cls = scorer_cls or SequenceLogps
    ref_path = cfg.reference.path or cfg.model.path
    in_memory = ref_model is not None
    ld_alpha = getattr(cfg.loss, "ld_alpha", None)
    ld = {} if ld_alpha is None else {"ld_alpha": ld_alpha}  # LD-DPO's weighted sums, for the reference as for the policy
    info: dict[str, Any] = {"strategy": strategy,
                            "path": (None if in_memory else ref_path) if strategy in ("copy", "cache") else None}
    if in_memory:
        info["model"] = "given in memory"

    def copy_scorer() -> nn.Module:
        model = freeze(ref_model) if in_memory else freeze(load_causal_lm(cfg.model, ref_path))
        if bf16 and not in_memory and not cfg.reference.sync_ref_model:  # a copy of our own, never moved: half its bytes
            layer_matrices_to_bf16(model)
        if compile:
            compile_layers(model)
        return scorer_cls(model, chunk_size=cfg.train.logprob_chunk_size, **ld).to(device)

    if strategy == "none":
        return Reference(), Reference(), info
    if strategy == "adapter":
        ref = adapter_reference(cfg, policy_scorer, info)
        return ref, ref, info
    if strategy == "copy":
        ref = FrozenCopyReference(copy_scorer())
        return ref, ref, info
    # cache
    model_hash = hash_module(ref_model) if in_memory else hash_files(check_folder(ref_path, "reference model"), WEIGHT_FILES)
    tokenizer_hash = (hash_tokenizer(tokenizer) if tokenizer is not None
                      else hash_files(check_folder(cfg.model.tokenizer or cfg.model.path, "tokenizer"), TOKENIZER_FILES))
    # how the values are computed: the precision, and LD-DPO's tail weight (other sums than the plain ones)
    precision = f"{cfg.model.dtype}{'+bf16autocast' if bf16 else ''}{'' if ld_alpha is None else f'+ld{ld_alpha}'}"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    refs = []
    for split, pairs in (("train", train), ("eval", held)):
        if not pairs:  # no eval set: nothing to compute or cache
            refs.append(Reference())
            continue
        key = cache_key(model_hash=model_hash, tokenizer_hash=tokenizer_hash, data_hash=hash_pairs(pairs), precision=precision)
        started = time.perf_counter()
        ref, warm = load_or_compute_cache(cache_dir=cfg.reference.cache_dir, key=key, pairs=pairs, scorer_factory=copy_scorer,
                                          collate=collate, batch_size=cfg.train.eval_batch_size or cfg.train.batch_size,
                                          device=device, autocast=autocast, progress=cfg.train.progress)
        info[f"{split}_cache"] = {"path": str(ref.path), "warm": warm, "seconds": round(time.perf_counter() - started, 3)}
        refs.append(ref)
    return refs[0], refs[1], info

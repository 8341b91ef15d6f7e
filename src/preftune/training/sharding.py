"""Sharded training (``train.sharding: fsdp``): torch's own FSDP2 (``fully_shard``), driven directly.

Why torch's FSDP2 and not a layer of our own or accelerate's plugin: it is torch's engine (the
one torchtune and TRL's FSDP2 path use), it runs on CPU (gloo) and GPU (NCCL), and accelerate
1.15 silently falls back to DDP on CPU, with full parameters on every rank (docs/scale.md).
accelerate stays the launcher, the process group and the autocast.

What is sharded, and how:

- the trained module (the stage's scorer around the policy, or the reward model): each decoder
  layer (the classes a transformers model names in ``_no_split_modules``) is one FSDP unit and
  the root takes the rest (embeddings, final norm, output projection), so a forward gathers one
  layer at a time. Each rank holds ``1 / processes`` of every parameter, its gradient and its
  AdamW state (AdamW steps over the DTensors);
- a frozen reference copy: sharded the same way, without gradients;
- LoRA: the same units; the frozen base weights are sharded beside the adapters (FSDP2 shards each
  parameter on its own, so frozen and trainable ones share a unit), only the adapters have
  gradients and AdamW state, and the adapter-off reference is the sharded policy itself with its
  adapter switched off (peft's ``disable_adapter``, a flag on each layer: no second copy);
- bf16 (``train.bf16``): FSDP2's ``MixedPrecisionPolicy`` gathers each decoder layer's parameters
  in bf16 (half the bytes of the all-gather and of the gathered layer) and reduces its gradients in
  fp32; the root's (embeddings, final norm, head) stay fp32 and autocast runs as without sharding,
  so a sharded bf16 run trains as one process's bf16 run does (:func:`shard_model`);
- gradients are averaged over the processes by the reduce-scatter, as DDP's all-reduce does, so
  the loop's scaling (each share is of the GLOBAL loss) is the same for both; clipping takes the
  norm over every shard (``clip_grad_norm_`` on DTensors);
- the final model is gathered into one full state dict (:func:`full_state_dict`, every rank
  takes part) and written by the main process with ``save_pretrained``.

Checkpoints: :mod:`preftune.training.sharded_checkpoint` (DCP, each process its part). Not
sharded yet, and refused at start with one line (:func:`check_supported`): ``train.compile=true``
(``auto`` stays eager under sharding).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import torch
from torch import nn

from preftune.errors import ConfigError


def check_supported(train: Any, *, processes: int) -> None:
    """Refuse, before anything is loaded, what ``train.sharding=fsdp`` does not run yet."""
    if train.sharding != "fsdp":
        return
    problems = []
    if processes < 2:
        problems.append("it needs several processes (launch with torchrun --nproc-per-node N, or accelerate launch)")
    if train.compile is True:
        problems.append("train.compile=true is not combined with sharding yet (set train.compile=false)")
    if problems:
        raise ConfigError("train.sharding=fsdp: " + "; ".join(problems) + ".")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model``: modules of a class that a transformers model inside it
    lists in ``_no_split_modules`` (LlamaDecoderLayer, GPTNeoXLayer, Qwen2DecoderLayer, ...)."""
    names = {name for module in model.modules() for name in (getattr(module, "_no_split_modules", None) or [])}
    return [module for module in model.modules() if type(module).__name__ in names]


def shard_model(model: nn.Module, *, bf16: bool) -> nn.Module:
    """``fully_shard`` each decoder layer of ``model``, then ``model`` itself (in place; returned)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"train.sharding=fsdp: found no decoder layers in {type(model).__name__} (no transformers "
                          "_no_split_modules): this model cannot be sharded by layer; use train.sharding=none.")
    # bf16: each layer is gathered, and computes, in bf16, its gradients reduced in fp32 (module docstring). Its
    # inputs are not cast, and the root (embeddings, final norm, head) keeps fp32: as under autocast, the residual
    # stream, the masks and the embedding and head gradients (sums over every token) stay fp32. Measured on 4 SGD
    # steps against one process's bf16 autocast, in multiples of the bf16 noise (tests/test_bf16.py's rule), weights:
    # every unit in bf16 2.2x (2.6x with uncast inputs), the root in fp32 1.3x, and this 0.2x (loss 0.8x).
    layer_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    root_policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mp_policy=layer_policy if bf16 else MixedPrecisionPolicy())
    fully_shard(model, mp_policy=root_policy if bf16 else MixedPrecisionPolicy())
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def no_sync(accelerator: Any, model: nn.Module, *, last: bool) -> Any:
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) on all but the last micro-batch of a group."""
    if is_sharded(model):
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last else accelerator.no_sync(model)


def local_numel(model: nn.Module) -> int:
    """Parameter elements this process holds (its shards; every element when unsharded)."""
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())


def held_bytes(params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the live tensors this process holds for ``params``: their (local) values, gradients
    and optimizer state."""
    def local(t: Any) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    state = sum(local(v) for p in params for v in optimizer.state.get(p, {}).values())
    return sum(local(p) + (local(p.grad) if p.grad is not None else 0) for p in params) + state


def say_held(params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> list[int]:
    """After the first optimizer step, one line (main process): what each process holds of the
    trained parameters, their gradients and optimizer state, against the whole (the sum)."""
    from preftune.system.distributed import all_gather, is_main

    held = all_gather(held_bytes(params, optimizer))
    if is_main():
        mib = ", ".join(f"{b / 2**20:.2f}" for b in held)
        print(f"preftune: sharded (FSDP2) over {len(held)} processes: each holds {mib} MiB of the trained parameters, their "
              f"gradients and optimizer state (unsharded: {sum(held) / 2**20:.2f} MiB)", file=sys.stderr)
    return held


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip by the norm over every shard of every gradient; return that norm (a plain tensor)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights, gathered from the shards onto the CPU (a collective: every
    process calls it; the main process gets the full dict, the others an empty one)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def part_of(state: dict[str, torch.Tensor], root: nn.Module, part: nn.Module) -> dict[str, torch.Tensor]:
    """The entries of ``root``'s state dict that belong to its submodule ``part``, keyed as ``part``'s own."""
    if part is root:
        return state
    prefix = next(name for name, module in root.named_modules() if module is part) + "."
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}

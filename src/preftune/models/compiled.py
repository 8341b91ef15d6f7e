"""``train.compile``: the decoder layers run through ``torch.compile`` (inductor).

What is compiled, and why there: each decoder layer's ``forward`` (attention, RoPE, RMSNorm,
SiLU-gated MLP, LoRA's adapters when present), one compiled function shared by all layers of a
model (the layer is an argument, so 8 layers cost one compilation, not 8). Outside it stay the
embedding lookup, the rotary table, and the chunked log-probs (:mod:`preftune.logprobs`), whose
custom autograd function recomputes logits in its backward and is mostly one matmul per chunk:
nothing for a compiler to fuse. Compiling per layer, not the whole model, keeps gradient
checkpointing working (the checkpoint wraps the compiled forward, which is recomputed as is) and
the graphs small (compile time grows with graph size).

Recompilations are bounded by ``dynamic=None`` (torch's automatic dynamic shapes): the first
batch compiles for its exact shape; the first batch of another length recompiles once with the
sequence dimension symbolic, and every later length reuses that graph. So a run compiles about
twice per mode it runs in (training with gradients; the reference's or evaluation's no-grad
forward; LoRA's adapter off), whatever its length distribution. Padding to a few bucket lengths
was the alternative: it compiles once per bucket and pays padding on every batch.

The compiled layer is bound with ``types.MethodType``, so ``copy.deepcopy`` of a model (a frozen
reference copy) binds the copy's own layers, never the original's.

Gradient checkpointing stays outside the compiled function whatever transformers does with it.
Up to 5.24 the decoder model's loop (or ``GradientCheckpointingLayer.__call__``) wrapped the
layer's call in the checkpoint, so an instance ``forward`` was what it recomputed. From 5.25 the
checkpoint is inside the class's ``forward`` (a wrapper that ``__init_subclass__`` puts around the
model's own ``forward``); compiling that wrapper puts ``torch.utils.checkpoint`` under dynamo,
which then compiles no graph at all and runs the step eagerly. So the layer's own ``forward``
(the wrapper's ``__wrapped__``) is compiled, and the instance ``forward`` checkpoints it exactly
as the wrapper would.

When inductor cannot compile on this machine (no C++ compiler, a compiler error), or dynamo
compiles no graph of the layer at its first call, the model runs eagerly and ONE line on stderr
says so: a probe compiles a two-op function first, and a failure at the first real call also
falls back (the same inputs then run eagerly).

Whether a run compiles (``train.compile``, ``auto`` included) is decided once per run in
:mod:`preftune.training.compile_choice`; this module only compiles.
"""

from __future__ import annotations

import functools
import sys
import types
from typing import Any

import torch
from torch import nn

#: dynamo's timers whose sum is the compile time: tracing + inductor for each graph (forward and
#: the joint graph), and the backward graph, which AOTAutograd compiles at the first backward
COMPILE_TIMERS = ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler")

_state: dict[str, Any] = {"probed": None, "warned": False}


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a (peft-wrapped, scorer-wrapped) causal LM: the modules of the first
    ``nn.ModuleList`` named ``layers`` or ``h`` whose elements all share one class."""
    for name, module in model.named_modules():
        named = isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h") and len(module) > 0
        if named and len({type(layer) for layer in module}) == 1:
            return list(module)
    return []


def _warn(message: str) -> None:
    if not _state["warned"]:
        _state["warned"] = True
        print(f"preftune: train.compile is off: {message}; running eagerly", file=sys.stderr)


def inductor_works() -> bool:
    """Whether inductor compiles and runs a two-op function here (probed once per process)."""
    if _state["probed"] is None:
        try:
            probe = torch.compile(lambda x: torch.sin(x) * 2.0 + 1.0, dynamic=False)
            x = torch.arange(4.0)
            _state["probed"] = bool(torch.allclose(probe(x), torch.sin(x) * 2.0 + 1.0))
            if not _state["probed"]:
                _warn("inductor's test function gave a wrong result")
        except Exception as err:  # noqa: BLE001 - any failure means: no compiler here
            _state["probed"] = False
            _warn(f"inductor cannot compile on this machine ({type(err).__name__}: {str(err).splitlines()[0][:160]})")
    return bool(_state["probed"])


def _own_forward(forward: Any) -> Any:
    """The layer's own ``forward``, without the checkpointing wrappers that transformers >= 5.25
    puts around it (one per subclass level; recognised by their code, not by a name)."""
    while getattr(forward, "__code__", None) is not None and forward.__code__.co_name == "forward_with_checkpointing" \
            and hasattr(forward, "__wrapped__"):
        forward = forward.__wrapped__
    return forward


def _has_compiled_code(function: Any) -> bool:
    """Whether dynamo holds compiled code for ``function`` (a graph of it, this call's or one that
    an earlier model of the same class compiled in this process). Asked through dynamo's debug
    accessor; where a torch release lacks it, assumed so."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:
        return True
    return len(_debug_get_cache_entry_list(function.__code__)) > 0


def _checkpointed(run: Any) -> Any:
    """``run(layer, *args, **kwargs)`` under the layer's checkpointing function when checkpointing
    is on (training, with gradients), as transformers' own wrapper does, caches dropped as it
    drops them."""

    def forward(layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
            if kwargs.get("use_cache"):
                kwargs["use_cache"] = False
            for name in ("cache", "layer_past"):
                if kwargs.get(name) is not None:
                    kwargs[name] = None
            return layer._gradient_checkpointing_func(functools.partial(run, layer, **kwargs), *args)
        return run(layer, *args, **kwargs)

    return forward


def compile_layers(model: nn.Module) -> int:
    """Compile ``model``'s decoder layers in place (see the module docstring); how many are compiled
    now (layers compiled before count too).

    0 when the model has no recognisable layers, or when inductor does not work here (one line on
    stderr).
    """
    every = decoder_layers(model)
    layers = [layer for layer in every if "forward" not in vars(layer)]
    if not every or not inductor_works():
        return 0
    if not layers:
        return len(every)
    wrapped = type(layers[0]).forward
    eager = _own_forward(wrapped)
    compiled = torch.compile(eager)
    first = {"call": True}

    def run(layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if _state["probed"] is False:
            return eager(layer, *args, **kwargs)
        try:
            if not first["call"]:
                return compiled(layer, *args, **kwargs)
            first["call"] = False
            out = compiled(layer, *args, **kwargs)
            if not _has_compiled_code(eager):
                _state["probed"] = False
                _warn(f"dynamo compiled no graph of {type(layer).__name__}.forward (it fell back to eager)")
            return out
        except Exception as err:  # noqa: BLE001
            from torch._dynamo.exc import BackendCompilerFailed

            if not isinstance(err, BackendCompilerFailed):
                raise  # not a compiler failure: the model's own error, as eager would raise it
            _state["probed"] = False
            _warn(f"inductor failed on the decoder layer ({str(err).splitlines()[0][:160]})")
            return eager(layer, *args, **kwargs)

    forward = run if eager is wrapped else _checkpointed(run)
    for layer in layers:
        layer.forward = types.MethodType(forward, layer)
    return len(every)


def uncompile_layers(model: nn.Module) -> None:
    """Back to the eager ``forward`` of every decoder layer."""
    for layer in decoder_layers(model):
        vars(layer).pop("forward", None)


def compile_stats() -> dict[str, float]:
    """Process totals so far: seconds spent compiling, and graphs compiled (each recompilation is
    one more). A run reports the difference between its end and its start."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    seconds = sum(sum(compilation_time_metrics.get(name, ())) for name in COMPILE_TIMERS)
    return {"compile/seconds": float(seconds), "compile/graphs": float(counters["stats"]["unique_graphs"])}

"""``train.compile`` resolved once per run: on or off, and why.

``true``/``false`` are taken as given. ``auto`` is decided at the start of a fresh run from:

- the device: under CUDA, on;
- on a CPU, the run's length against the model's size: on when the planned optimizer steps
  reach :func:`min_cpu_steps` (:data:`AUTO_CPU_MIN_STEPS` for a model of the 34M benchmark's
  size, proportionally fewer for a larger model, more for a smaller one), AND inductor has a
  C++ compiler here (found the way inductor looks for one: ``$CXX``, else ``g++``). Without one
  ``auto`` stays eager and the log says why; an explicit ``true`` without one is refused before
  anything is loaded onto the model (a :class:`~preftune.errors.ConfigError`).

A resumed run does not decide again: it takes the choice its checkpoint recorded
(``state.json``'s ``compiled``; a checkpoint written before it was recorded ran eagerly), whatever
its new ``max_steps``, because a compiled step is not bitwise the eager one (log-probs agree to
about 1e-6) and a resume must continue the run it resumes. An explicit ``true``/``false`` that
differs from the recorded choice is honoured (compiling changes the rounding of a step, not what
it computes: the same reason a resume may run on another machine) and the log says the result
will not be bitwise the uninterrupted run's. With several processes the main one decides and
every process takes its answer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preftune.errors import ConfigError
from preftune.models.compiled import compile_layers
from preftune.system.distributed import decided_on_main
from preftune.training.checkpoint import STATE_FILE
from preftune.training.precision import model_params

#: ``auto`` compiles a CPU run of a model of :data:`AUTO_CPU_REFERENCE_PARAMS` parameters that
#: plans at least this many optimizer steps. Derived from the 34M benchmark (batch 8, about 3,000
#: real tokens a step, 2 cores; benchmarks/RESULTS.md, issue 16, a quiet machine): eager 869
#: tokens/s, compiled 920, so a step takes 3.45 s eager and 3.26 s compiled: 0.19 s saved a step.
#: A cold compile (inductor's on-disk cache empty; the policy and the reference copy, 4 graphs)
#: took 111 s (load average 0.9 rising to 5.9) and 73-290 s on busier machines: 290 s / 0.19 s is
#: about 1,500 steps to win back the worst measured, and 2,000 leaves a third more for a slower
#: compile or a smaller gain. A warm cache makes later compiles take seconds, so this errs
#: towards eager.
AUTO_CPU_MIN_STEPS = 2000
#: parameters of the 34M benchmark model (fixtures' model-34m: 8 layers, hidden 512, vocabulary 8192)
AUTO_CPU_REFERENCE_PARAMS = 33_694_208


def min_cpu_steps(params: int) -> int:
    """The planned optimizer steps from which ``auto`` compiles on a CPU, for a model of ``params``.

    Scaled from :data:`AUTO_CPU_MIN_STEPS` in inverse proportion to the parameter count: the time
    a compiled step saves is a share of the step, whose work grows with the model, while the
    compile time does not shrink with it (the 2-layer test models still take 20-60 s). This is
    cautious for small models, whose steps are mostly fixed overhead: they stay eager (the
    tests' 30k-parameter models would need millions of steps).
    """
    return math.ceil(AUTO_CPU_MIN_STEPS * AUTO_CPU_REFERENCE_PARAMS / max(params, 1))


@dataclass(frozen=True)
class CompileChoice:
    """What ``train.compile`` resolved to for one run, and the reason, as the log says it."""

    on: bool
    why: str
    setting: bool | str = "auto"

    def line(self) -> str:
        """``train.compile auto -> off (why)``: how the run's start line says it."""
        given = "auto" if self.setting == "auto" else str(bool(self.setting)).lower()
        return f"train.compile {given} -> {'on' if self.on else 'off'} ({self.why})"

    def record(self) -> dict[str, Any]:
        """What ``status.json`` keeps of it."""
        return {"on": self.on, "setting": self.setting, "why": self.why}


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would use on a CPU (``$CXX``, else ``g++``, as it searches), or None."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:  # noqa: BLE001 - InvalidCxxCompiler, or inductor missing from this torch: no compiler for us
        return None


def recorded_choice(folder: Path) -> bool:
    """Whether the run that wrote checkpoint ``folder`` ran compiled (an older checkpoint, without the record: no)."""
    try:
        return bool(json.loads((Path(folder) / STATE_FILE).read_text()).get("compiled", False))
    except (OSError, ValueError, AttributeError):
        return False


def decide(setting: bool | str, device: str, steps: int, params: int, *, compiler: Any = None,
           recorded: bool | None = None) -> CompileChoice:
    """``train.compile`` resolved (see the module docstring). ``recorded`` is the resumed checkpoint's
    choice (None: a fresh run); ``compiler`` finds inductor's C++ compiler (default: :func:`cxx_compiler`),
    asked only when the choice depends on it."""
    cpu = device != "cuda"

    def no_compiler() -> bool:
        return cpu and (compiler or cxx_compiler)() is None

    if setting not in ("auto", True, False):
        raise ConfigError(f"train.compile must be true, false or auto, not {setting!r}.")
    if setting is True and no_compiler():
        raise ConfigError("train.compile=true, but inductor finds no C++ compiler on this machine (it runs $CXX, else g++): "
                          "install one (g++), or set train.compile=auto or false to train eagerly.")
    if recorded is not None:
        if setting == "auto":
            if recorded and no_compiler():
                return CompileChoice(False, "resumed from a compiled run, but inductor finds no C++ compiler here: eager, so the "
                                     "result will not be bitwise the uninterrupted run's", setting)
            return CompileChoice(recorded, f"the checkpoint resumed from ran {'compiled' if recorded else 'eagerly'}", setting)
        if bool(setting) != recorded:
            return CompileChoice(bool(setting), f"set explicitly; the checkpoint resumed from ran {'compiled' if recorded else 'eagerly'}, "
                                 "so the result will not be bitwise the uninterrupted run's", setting)
        return CompileChoice(bool(setting), "set explicitly, as the checkpoint resumed from ran", setting)
    if setting != "auto":
        return CompileChoice(bool(setting), "set explicitly", setting)
    if not cpu:
        return CompileChoice(True, "CUDA", setting)
    needed = min_cpu_steps(params)
    size = f"a model of {params / 1e6:.2f}M parameters"
    if steps < needed:
        return CompileChoice(False, f"CPU, {steps} planned steps < {needed} for {size}: compiling would not pay for itself", setting)
    if no_compiler():
        return CompileChoice(False, f"CPU, {steps} planned steps >= {needed} for {size}, but inductor finds no C++ compiler "
                             "($CXX, else g++)", setting)
    return CompileChoice(True, f"CPU, {steps} planned steps >= {needed} for {size}", setting)


def resolve_compile(train: Any, model: nn.Module, steps: int, device: torch.device | str, *, resume: Path | None) -> CompileChoice:
    """``train.compile`` for a run training ``model`` for ``steps`` optimizer steps (its plan's): decided on
    the main process (a resume, from the checkpoint ``resume`` of the run's plan, reads its record), taken
    by every other (the run's start line says it: :meth:`preftune.stages.lifecycle.Run.train`)."""

    def choose() -> CompileChoice:
        if train.sharding == "fsdp" and train.compile == "auto":  # compiled FSDP2 units are not tested yet
            return CompileChoice(False, "sharded runs are eager (train.sharding=fsdp)")
        return decide(train.compile, torch.device(device).type, steps, model_params(model),
                      recorded=None if resume is None else recorded_choice(resume))

    return decided_on_main(choose)


def compile_for_run(choice: CompileChoice, model: nn.Module) -> bool:
    """Compile ``model``'s decoder layers when the run's choice says so; whether they now run compiled
    (False where inductor fails its probe: one line says so)."""
    return choice.on and compile_layers(model) > 0

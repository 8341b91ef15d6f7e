"""``train.bf16`` resolved once per run: bf16 autocast on or off, and why.

``true``/``false`` are taken as given. ``null`` (auto) is decided at the start of a fresh run from:

- the device's bf16 matrix units (:func:`preftune.system.hardware.bf16_units`): a CUDA device that
  supports bf16, or an x86 CPU with AMX or ``avx512_bf16``. Without them bf16 matmuls are
  emulated through fp32: slower than fp32 and less exact, so auto stays fp32;
- the model's size: bf16 pays only where the matrices are large enough for the bf16 units to
  win back autocast's casts. Auto turns it on from :data:`AUTO_MIN_PARAMS` parameters (the
  derivation is at the constant); smaller models, the tests' and the demo's among them, stay
  fp32 on every processor.

A resumed run does not decide again: it takes the choice its checkpoint recorded
(``state.json``'s ``bf16``), so a resume continues the run it resumes, bitwise on one machine,
also on a machine where auto would have chosen otherwise (the line then says so). An explicit
``true``/``false`` that differs from the recorded choice is honoured, and the line says the result
will not be bitwise the uninterrupted run's. A checkpoint written before the choice was recorded
is decided afresh, saying so. With several processes the main process decides and every process
takes its answer; the run's start line says it (:func:`preftune.stages.lifecycle.train`), and the stage records it in the
run's ``config.yaml`` (``train.bf16``: the resolved value), ``status.json`` (``precision``) and
every checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preftune.errors import ConfigError
from preftune.system.distributed import decided_on_main
from preftune.system.hardware import bf16_units
from preftune.training.checkpoint import STATE_FILE

#: Auto turns bf16 autocast on from this many parameters, on a device with bf16 units.
#:
#: Derived from two measurements of a DPO training step (batch 8, max length 512, 2 cores) on an
#: Intel Xeon with AMX (issue 21): the 0.18M-parameter demo model (hidden 64) ran 1.5x slower in
#: bf16 than in fp32, the 34M benchmark model (hidden 512) 1.9x faster. The speed-up taken as
#: linear in log(parameters) through those two points crosses 1.0 at about 1.4M parameters and
#: reaches 1.3x at about 5M. Auto asks for that 1.3x: bf16 costs accuracy (8 bits of mantissa) and
#: bitwise agreement with fp32 runs, and a two-point fit is uncertain near its break-even, so it
#: errs towards fp32. On a processor without bf16 units bf16 is slower at every size measured
#: here (``benchmarks/precision.py``; benchmarks/RESULTS.md), which is why the units decide first.
#: No GPU crossover has been measured: CUDA uses the same threshold (a model under 5M parameters
#: is launch-bound on a GPU, where bf16 saves little).
AUTO_MIN_PARAMS = 5_000_000


@dataclass(frozen=True)
class PrecisionChoice:
    """What ``train.bf16`` resolved to for one run, and the reason, as the log says it."""

    bf16: bool
    why: str
    setting: bool | None = None

    @property
    def name(self) -> str:
        """``bf16`` (autocast over the model's weights) or ``fp32``."""
        return "bf16" if self.bf16 else "fp32"

    def line(self) -> str:
        """``train.bf16 auto -> off (why)``: how the run's start line says it."""
        given = "auto" if self.setting is None else str(bool(self.setting)).lower()
        return f"train.bf16 {given} -> {'on' if self.bf16 else 'off'} ({self.why})"

    def record(self) -> dict[str, Any]:
        """What ``status.json`` keeps of it."""
        return {"bf16": self.bf16, "setting": "auto" if self.setting is None else self.setting, "why": self.why}

    def autocast(self, device_type: str) -> Any:
        """The autocast context a forward pass of this run runs in."""
        from contextlib import nullcontext

        return torch.autocast(device_type, dtype=torch.bfloat16) if self.bf16 else nullcontext()


def recorded_choice(folder: Path) -> bool | None:
    """The precision checkpoint ``folder`` ran in (``state.json``'s ``bf16``); None when not recorded."""
    try:
        value = json.loads((Path(folder) / STATE_FILE).read_text()).get("bf16")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, bool) else None


def decide(setting: bool | None, device: str, params: int, *, units: tuple[bool, str] | None = None,
           recorded: bool | None = None, resuming: bool = False) -> PrecisionChoice:
    """``train.bf16`` resolved (see the module docstring). ``units`` is whether the device has bf16
    matrix units and what they are (default: :func:`preftune.system.hardware.bf16_units` for ``device``);
    ``recorded`` the resumed checkpoint's choice (None: a fresh run, or ``resuming`` from a
    checkpoint that did not record it)."""
    if setting not in (None, True, False):
        raise ConfigError(f"train.bf16 must be true, false or null (auto), not {setting!r}.")
    has, what = units if units is not None else bf16_units(device)
    if recorded is not None:
        ran = "bf16" if recorded else "fp32"
        if setting is None:
            fresh = _auto(device, params, has, what)
            if fresh.bf16 != recorded:
                return PrecisionChoice(recorded, f"the checkpoint resumed from ran {ran}; auto would choose "
                                       f"{fresh.name} here ({fresh.why}), but a resume keeps the run's precision: set "
                                       f"train.bf16={str(fresh.bf16).lower()} to change it", setting)
            return PrecisionChoice(recorded, f"the checkpoint resumed from ran {ran}", setting)
        if setting != recorded:
            return PrecisionChoice(setting, f"set explicitly; the checkpoint resumed from ran {ran}, so the result will not be "
                                   "bitwise the uninterrupted run's", setting)
        return PrecisionChoice(setting, f"set explicitly, as the checkpoint resumed from ran {ran}", setting)
    if setting is not None:
        if setting and not has:
            return PrecisionChoice(True, f"set explicitly; {what}, so bf16 is emulated and slower than fp32", setting)
        return PrecisionChoice(setting, "set explicitly", setting)
    choice = _auto(device, params, has, what)
    if resuming:
        return PrecisionChoice(choice.bf16, f"{choice.why}; the checkpoint resumed from did not record its precision", setting)
    return choice


def _auto(device: str, params: int, has: bool, what: str) -> PrecisionChoice:
    size = f"a model of {params / 1e6:.2f}M parameters"
    if not has:
        return PrecisionChoice(False, what)
    if params < AUTO_MIN_PARAMS:
        return PrecisionChoice(False, f"{what}, but {size} < {AUTO_MIN_PARAMS / 1e6:g}M: too small for bf16 to pay")
    return PrecisionChoice(True, f"{what}, {size} >= {AUTO_MIN_PARAMS / 1e6:g}M")


def model_params(model: nn.Module) -> int:
    """Every parameter of ``model``, trainable or not (LoRA's frozen base does the matmuls too)."""
    return sum(p.numel() for p in model.parameters())


def resolve_precision(train: Any, model: nn.Module, device: torch.device | str, *, resume: Path | None) -> PrecisionChoice:
    """``train.bf16`` for a run training ``model``: decided on the main process (a resume, from the
    checkpoint ``resume`` of the run's plan, reads its record), taken by every other (the run's start line says it)."""
    def choose() -> PrecisionChoice:
        return decide(train.bf16, torch.device(device).type, model_params(model),
                      recorded=None if resume is None else recorded_choice(resume), resuming=resume is not None)

    return decided_on_main(choose)


def new_accelerator(accelerator_cls: type, precision: PrecisionChoice) -> Any:
    """An Accelerator with this run's precision, also when an earlier run in the process set another.

    accelerate keeps its settings in a process-wide singleton that refuses a second, different
    ``mixed_precision``; a process that runs several trainings (a beta sweep, iterative DPO, the
    demo, tests) needs each run's own. The process group (PartialState) is kept.
    """
    from accelerate.state import AcceleratorState, GradientState

    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    return accelerator_cls(mixed_precision="bf16" if precision.bf16 else "no", cpu=not torch.cuda.is_available())

"""What the processor can do fast: the facts ``train.bf16: null`` (auto) and the benchmarks read.

bf16 pays only where the hardware multiplies bf16 matrices natively: CUDA devices that support
bf16, and x86 CPUs with AMX (``amx_bf16``/``amx_tile``, Sapphire Rapids and later) or
``avx512_bf16`` (Cooper Lake, Zen 4). Elsewhere bf16 matmuls are emulated through fp32 and run
slower than fp32 itself, for a loss of accuracy that buys nothing.

``PREFTUNE_CPU_BF16_UNITS=1`` (or ``0``) makes :func:`cpu_has_bf16_units` answer yes (or no)
whatever the flags say: the test suite fixes it to ``0`` so that its numbers mean the same on
every processor, and runs its precision-sensitive tests again with ``1`` (see ``tests/conftest.py``).
Whether bf16 is then used is decided in :mod:`preftune.training.precision`.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: the CPU flags that decide fp32 and bf16 matmul speed
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@lru_cache(maxsize=1)
def default_device() -> torch.device:
    """The device preftune runs on: this process's CUDA device when there is one, else the CPU. The one
    place that choice is made; a launcher that pins each process to its GPU (torchrun, accelerate) sets
    the current CUDA device first."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_info() -> dict[str, Any]:
    """The processor's model name, the flags of :data:`CPU_FLAGS` it has, its logical cores, and
    what torch's kernels were dispatched for (``torch.backends.cpu.get_cpu_capability``)."""
    import torch

    model, flags = platform.processor() or "unknown", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("unknown", platform.processor()):
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: "unknown")()
    return {"cpu": model, "flags": {flag: flag in flags for flag in CPU_FLAGS}, "cores": os.cpu_count(),
            "torch": torch.__version__, "torch_cpu_capability": capability}


def processor_name(device_type: str) -> str:
    """The processor a run computes on, in words: ``CUDA NVIDIA H100 80GB HBM3`` or ``CPU Intel(R) Xeon(R) ... (2 cores)``."""
    import torch

    if device_type == "cuda" and torch.cuda.is_available():
        return f"CUDA {torch.cuda.get_device_name()}"
    info = cpu_info()
    return f"CPU {info['cpu']} ({info['cores']} cores)"


#: Forces what :func:`cpu_has_bf16_units` answers: "1" yes, "0" no (the tests' setting)
UNITS_ENV = "PREFTUNE_CPU_BF16_UNITS"


def cpu_has_bf16_units() -> bool:
    """An x86 CPU with AMX or avx512_bf16 (see the module docstring), unless ``$PREFTUNE_CPU_BF16_UNITS`` says otherwise."""
    forced = os.environ.get(UNITS_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return any(cpu_info()["flags"][flag] for flag in BF16_CPU_FLAGS)


def bf16_units(device_type: str) -> tuple[bool, str]:
    """Whether the device type ("cuda" or "cpu") multiplies bf16 matrices natively, and in words what it has."""
    import torch

    if device_type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return True, f"CUDA {torch.cuda.get_device_name()} (bf16 supported)"
        return False, "CUDA device without bf16 support"
    forced = os.environ.get(UNITS_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1", f"CPU {'with' if forced == '1' else 'without'} bf16 units (as ${UNITS_ENV}={forced} says)"
    flags = cpu_info()["flags"]
    found = [flag for flag in BF16_CPU_FLAGS if flags[flag]]
    if found:
        return True, f"CPU with {'AMX' if flags['amx_bf16'] else 'avx512_bf16'} ({', '.join(found)})"
    best = "avx512f" if flags["avx512f"] else "avx2" if flags["avx2"] else "no avx2"
    return False, f"CPU without bf16 units ({best}; no amx_bf16 or avx512_bf16)"


def bf16_wins(device_type: str) -> bool:
    """Whether the device type ("cuda" or "cpu") has bf16 matrix units (whether a model is large
    enough for them to pay is :mod:`preftune.training.precision`'s question)."""
    return bf16_units(device_type)[0]

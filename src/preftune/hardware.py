"""What the processor can do fast: the facts ``train.bf16: null`` (auto) and the benchmarks read.

bf16 pays only where the hardware multiplies bf16 matrices natively: CUDA devices that support
bf16, and x86 CPUs with AMX (``amx_bf16``/``amx_tile``, Sapphire Rapids and later) or
``avx512_bf16`` (Cooper Lake, Zen 4). Elsewhere bf16 matmuls are emulated through fp32 and run
slower than fp32 itself, for a loss of accuracy that buys nothing.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path
from typing import Any

#: the CPU flags that decide fp32 and bf16 matmul speed
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@lru_cache(maxsize=1)
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


def cpu_has_bf16_units() -> bool:
    """An x86 CPU with AMX or avx512_bf16 (see the module docstring)."""
    return any(cpu_info()["flags"][flag] for flag in BF16_CPU_FLAGS)


def bf16_wins(device_type: str) -> bool:
    """Whether bf16 autocast is the faster precision on this device type ("cuda" or "cpu")."""
    import torch

    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_has_bf16_units()

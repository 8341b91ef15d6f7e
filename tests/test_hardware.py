"""hardware.py: what the processor is and which flags it has (its bf16 units: tests/test_precision.py)."""

from __future__ import annotations

import torch

from preftune.system import hardware


def test_cpu_info_names_the_processor_and_the_flags_that_matter() -> None:
    info = hardware.cpu_info()
    assert info["cpu"] and info["cores"] >= 1 and info["torch"] == torch.__version__
    assert set(info["flags"]) == {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}

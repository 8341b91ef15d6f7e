"""hardware.py: precision auto picks bf16 only where the processor has bf16 matrix units."""

from __future__ import annotations

import pytest
import torch

from preftune import hardware
from preftune.config import TrainConfig
from preftune.models.load import use_bf16


def test_cpu_info_names_the_processor_and_the_flags_that_matter() -> None:
    info = hardware.cpu_info()
    assert info["cpu"] and info["cores"] >= 1 and info["torch"] == torch.__version__
    assert set(info["flags"]) == {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


@pytest.mark.parametrize(("flags", "expected"), [
    ({"avx2": True, "avx512f": True}, False),  # this kind of machine: bf16 emulated, slower than fp32
    ({"avx512f": True, "avx512_bf16": True}, True),
    ({"amx_bf16": True, "amx_tile": True}, True),
])
def test_auto_precision_follows_the_cpu_flags(monkeypatch: pytest.MonkeyPatch, flags: dict, expected: bool) -> None:
    if torch.cuda.is_available():
        pytest.skip("auto reads the GPU here, not the CPU flags")
    fake = {**hardware.cpu_info(), "flags": {flag: flags.get(flag, False) for flag in hardware.CPU_FLAGS}}
    monkeypatch.setattr(hardware, "cpu_info", lambda: fake)
    assert use_bf16(TrainConfig()) is expected
    assert use_bf16(TrainConfig(bf16=not expected)) is (not expected)  # an explicit setting wins

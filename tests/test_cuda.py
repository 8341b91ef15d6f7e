"""The CUDA and bf16 paths. Skipped (with the reason) on machines without a GPU, such as CI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO
from preftune.config.schema import DPOConfig, load_config
from preftune.logprobs import completion_logps, naive_completion_logps
from preftune.stages.dpo import run as run_dpo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def _cfg(model_dir: Path, train: Path, held: Path, out: Path, *overrides: str) -> DPOConfig:
    base = [f"--model.path={model_dir}", f"--data.train={train}", f"--data.eval={held}", f"--train.output_dir={out}",
            "--train.progress=false"]
    return load_config(DPOConfig, REPO / "configs" / "dpo-tiny.yaml", base + list(overrides))


def _evals(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "eval/rewards/accuracies" in m]


def test_chunked_logps_on_cuda_match_naive_in_fp32_and_bf16() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(4, 40, 64, device="cuda", requires_grad=True)
    weight = torch.randn(1000, 64, device="cuda", requires_grad=True)
    labels = torch.randint(0, 1000, (4, 40), device="cuda")
    labels[:, :10] = -100
    labels[1, 30:] = -100
    got, n = completion_logps(hidden, weight, labels, chunk_size=17)
    want, m = naive_completion_logps(hidden @ weight.T, labels)
    assert torch.equal(n, m)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    grads = torch.autograd.grad(got.sum(), (hidden, weight))
    wants = torch.autograd.grad(want.sum(), (hidden, weight))
    for g, w in zip(grads, wants):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low, _ = completion_logps(hidden, weight, labels, chunk_size=17)
    assert low.dtype == torch.float32
    # bf16 matmuls: within a few tenths of a nat over 30 tokens of a random 1000-way softmax
    assert float((low - want).detach().abs().max()) < 0.05 * float(want.detach().abs().max())


@pytest.mark.parametrize("strategy,lora", [("copy", False), ("cache", False), ("adapter", True)])
def test_dpo_learns_on_cuda_with_bf16_autocast(
    tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path, strategy: str, lora: bool
) -> None:
    train, held = preference_files
    extra = ["--model.lora.enabled=true", "--model.lora.r=8", "--train.lr=5e-3"] if lora else []
    run = run_dpo(_cfg(tiny_model_dir, train, held, tmp_path / strategy, "--train.bf16=true",
                       f"--reference.strategy={strategy}", f"--reference.cache_dir={tmp_path / 'cache'}", *extra))
    evals = _evals(run)
    assert all(torch.isfinite(torch.tensor(m["eval/loss"])) for m in evals)
    assert evals[-1]["eval/rewards/accuracies"] >= 0.8, evals
    assert (run / "final").is_dir()

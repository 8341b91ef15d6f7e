"""models/compiled.py (``train.compile``): compiled decoder layers give the eager log-probs and
gradients, recompile a bounded number of times over many lengths, survive a deepcopy, and fall
back to eager with one line when inductor cannot compile.

Compiling costs tens of seconds on 2 cores (less once inductor's on-disk cache is warm), so the
compiled tests are few, tiny and marked slow.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from conftest import TINY_PAD, dpo_config, random_pairs, read_metrics, run_python, sigint_at_step, tiny_lm
from preftune.data.collate import collate_prefix_shared
from preftune.models.compiled import (
    compile_layers,
    compile_stats,
    decoder_layers,
    uncompile_layers,
)
from preftune.models.load import apply_lora, enable_gradient_checkpointing
from preftune.models.scorers import SharedPrefixLogps


def test_the_decoder_layers_are_found() -> None:
    assert len(decoder_layers(SharedPrefixLogps(tiny_lm()))) == 2


def _logps_and_grads(scorer: SharedPrefixLogps, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    scorer.zero_grad(set_to_none=True)
    logps, _ = scorer(batch["input_ids"], batch["attention_mask"], batch["labels"])
    (logps * torch.linspace(-1, 1, len(logps))).sum().backward()
    grads = {n: p.grad.clone() for n, p in scorer.named_parameters() if p.grad is not None}
    return logps.detach(), grads


@pytest.mark.full
@pytest.mark.slow
def test_compiled_prefix_shared_logps_and_grads_equal_eager() -> None:
    """Prefix sharing + chunked log-probs + LoRA + gradient checkpointing: compiled == eager to
    1e-5 over 5 batches of 5 lengths, with at most 2 graphs per mode (automatic dynamic shapes).
    (Without LoRA and checkpointing: the DPO run below.)"""
    from preftune.config.schema import LoraConfig

    lm = apply_lora(tiny_lm("sdpa"), LoraConfig(enabled=True, r=4, alpha=8))
    enable_gradient_checkpointing(lm)
    lm.train()
    scorer = SharedPrefixLogps(lm, chunk_size=7)
    pairs = random_pairs(20, seed=3)
    batches = [collate_prefix_shared(pairs[i : i + 4], pad_token_id=TINY_PAD) for i in range(0, 20, 4)]
    assert len({b["input_ids"].shape[1] for b in batches}) >= 4  # lengths differ: the recompile bound is tested
    eager = [_logps_and_grads(scorer, b) for b in batches]
    assert compile_layers(scorer) == 2
    before = compile_stats()
    for batch, (eager_logps, eager_grads) in zip(batches, eager, strict=True):
        logps, grads = _logps_and_grads(scorer, batch)
        torch.testing.assert_close(logps, eager_logps, atol=1e-5, rtol=1e-5)
        assert grads.keys() == eager_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], eager_grads[name], atol=1e-5, rtol=1e-4)
    after = compile_stats()
    graphs = after["compile/graphs"] - before["compile/graphs"]
    assert 1 <= graphs <= 2, f"{graphs} graphs for 5 lengths"
    assert after["compile/seconds"] > before["compile/seconds"]
    # no-grad (the reference's forward) is a second mode: again at most 2 graphs
    with torch.no_grad():
        for batch, (eager_logps, _) in zip(batches, eager, strict=True):
            logps, _ = scorer(batch["input_ids"], batch["attention_mask"], batch["labels"])
            torch.testing.assert_close(logps, eager_logps, atol=1e-5, rtol=1e-5)
    assert compile_stats()["compile/graphs"] - before["compile/graphs"] <= 4
    # a deepcopy (a frozen reference copy) runs its own weights, not the original's
    twin = copy.deepcopy(scorer)
    with torch.no_grad():
        for param in twin.parameters():
            param.add_(0.5)
        assert not torch.allclose(twin(batches[0]["input_ids"], batches[0]["attention_mask"], batches[0]["labels"])[0],
                                  eager[0][0])
    uncompile_layers(scorer)
    assert all("forward" not in vars(layer) for layer in decoder_layers(scorer))


FALLBACK_SCRIPT = """
import torch
from conftest import tiny_lm
from preftune.models.compiled import compile_layers, decoder_layers
lm = tiny_lm()
assert compile_layers(lm) == 0 and compile_layers(tiny_lm()) == 0
assert all("forward" not in vars(layer) for layer in decoder_layers(lm))
assert lm(input_ids=torch.randint(1, 60, (2, 5))).logits.shape == (2, 5, 61)
print("eager ok")
"""


@pytest.mark.full
def test_inductor_failure_falls_back_with_one_line(tmp_path: Path) -> None:
    """No working C++ compiler (CXX points nowhere; inductor caches what it finds, hence a process of
    its own): one line on stderr, no traceback, nothing compiled, the eager model still runs."""
    env = {"CXX": "/nonexistent/preftune-test-cxx", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    done = run_python("-c", FALLBACK_SCRIPT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "eager ok"
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith("preftune: train.compile is off") and "running eagerly" in lines[0]


@pytest.mark.full
@pytest.mark.slow
@pytest.mark.fp32_exact
def test_compiled_dpo_run_reports_compile_time_matches_eager_and_resumes_bitwise(
    tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`preftune dpo` with train.compile=true (prefix sharing, frozen reference copy compiled too):
    the eager run's losses to 1e-5, and compile time in metrics.jsonl, apart from the step time.
    Then a run that ``auto`` compiles (its threshold lowered) stops at step 2 and resumes with
    max_steps=3, which alone would not compile: it runs compiled as its checkpoint recorded, to the
    uninterrupted compiled run's weights, bitwise (an eager step 3 differs in the last bits)."""

    from conftest import assert_same_weights, weights
    from preftune.stages.dpo import run as run_dpo
    from preftune.training import compile_choice
    from preftune.training.interrupts import Interrupted

    train, _ = preference_files
    common = ["--data.group_by_length=false", "--train.log_every=1", "--train.save_every=null", "--train.eval_every=null",
              "--train.scheduler=constant", "--train.warmup_steps=0"]
    losses, records = {}, {}
    for setting in ("false", "true"):
        run = run_dpo(dpo_config(tiny_model_dir, train, None, tmp_path / setting, f"--train.compile={setting}",
                                 "--train.max_steps=3", *common))
        records[setting] = [m for m in read_metrics(run) if "loss" in m]
        losses[setting] = [m["loss"] for m in records[setting]]
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-5)
    assert all("compile/seconds" not in m for m in records["false"])
    last = records["true"][-1]
    assert last["compile/seconds"] > 0 and 1 <= last["compile/graphs"] <= 6

    monkeypatch.setattr(compile_choice, "min_cpu_steps", lambda params: 4)
    stopped = tmp_path / "stopped"
    with pytest.raises(Interrupted):
        run_dpo(dpo_config(tiny_model_dir, train, None, stopped, "--train.max_steps=6", *common), extra_terms=[sigint_at_step(2)])
    resumed = run_dpo(dpo_config(tiny_model_dir, train, None, stopped, "--train.max_steps=3", "--train.resume_from=latest", *common))
    assert "compile/seconds" in read_metrics(resumed)[-1]
    assert_same_weights(weights(tmp_path / "true" / "final"), weights(resumed / "final"), atol=0.0)


@pytest.mark.full
def test_a_layer_that_dynamo_compiles_to_no_graph_runs_eagerly_and_says_so(monkeypatch: pytest.MonkeyPatch,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Compiling what dynamo then runs eagerly (here a forward it is told to skip; under transformers 5.25 it was the
    checkpointing wrapper) is said in one line, never a silent eager step."""
    from torch import nn

    from preftune.models import compiled

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)

        @torch._dynamo.disable
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x).relu()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Layer(), Layer()])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x

    monkeypatch.setattr(compiled, "_state", {"probed": None, "warned": False})
    net, x = Net(), torch.randn(3, 4)
    eager = net(x)
    assert compile_layers(net) == 2
    torch.testing.assert_close(net(x), eager)
    torch.testing.assert_close(net(x), eager)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("preftune:")]
    assert lines == ["preftune: train.compile is off: dynamo compiled no graph of Layer.forward (it fell back to eager); running eagerly"]


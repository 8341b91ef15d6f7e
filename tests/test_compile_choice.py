"""compile_choice.py: ``train.compile`` resolved once per run (device, planned steps for the model's
size, a C++ compiler for inductor, explicit values), recorded in the checkpoint and taken over by
a resume whatever its new ``max_steps``.

Nothing here really compiles: the choice and its record are what is tested (the decoder layers'
compilation is stubbed where a run would compile). The one compiled resume, bitwise against an
uninterrupted compiled run, is in tests/test_compiled.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import REPO, assert_same_weights, dpo_config, read_metrics, sigint_at_step, weights
from preftune.config.schema import TrainConfig
from preftune.errors import ConfigError
from preftune.stages.dpo import run as run_dpo
from preftune.training import compile_choice
from preftune.training.checkpoint import STATE_FILE, write_manifest
from preftune.training.compile_choice import (
    AUTO_CPU_MIN_STEPS,
    AUTO_CPU_REFERENCE_PARAMS,
    cxx_compiler,
    decide,
    min_cpu_steps,
    recorded_choice,
)
from preftune.training.interrupts import Interrupted
from preftune.training.runplan import planned_steps

M34 = AUTO_CPU_REFERENCE_PARAMS


def no_compiler() -> None:
    return None


def gxx() -> str:
    return "g++"


def never_asked() -> str:
    raise AssertionError("the compiler was looked for where the choice does not depend on it")


def test_the_threshold_scales_with_the_model() -> None:
    assert min_cpu_steps(M34) == AUTO_CPU_MIN_STEPS
    assert min_cpu_steps(10 * M34) == AUTO_CPU_MIN_STEPS // 10
    assert min_cpu_steps(30_000) > 100_000  # the tests' tiny models stay eager however long a run they plan


def test_auto_on_a_cpu_follows_the_planned_steps_and_the_compiler() -> None:
    short = decide("auto", "cpu", AUTO_CPU_MIN_STEPS - 1, M34, compiler=never_asked)
    assert not short.on and f"{AUTO_CPU_MIN_STEPS - 1} planned steps < {AUTO_CPU_MIN_STEPS}" in short.why
    long = decide("auto", "cpu", 20000, M34, compiler=gxx)
    assert long.on
    assert long.line() == "train.compile auto -> on (CPU, 20000 planned steps >= 2000 for a model of 33.69M parameters)"
    without = decide("auto", "cpu", 20000, M34, compiler=no_compiler)
    assert not without.on and "no C++ compiler" in without.line()
    assert not decide("auto", "cpu", 100_000, 30_000, compiler=never_asked).on  # a tiny model


def test_auto_under_cuda_and_explicit_values() -> None:
    assert decide("auto", "cuda", 1, 1000, compiler=never_asked).on
    assert decide(True, "cpu", 1, 1000, compiler=gxx).on
    assert decide(True, "cuda", 1, 1000, compiler=never_asked).line() == "train.compile true -> on (set explicitly)"
    assert not decide(False, "cpu", 10**9, 10**9, compiler=never_asked).on
    with pytest.raises(ConfigError, match=r"train.compile=true, but inductor finds no C\+\+ compiler .*train.compile=auto or false"):
        decide(True, "cpu", 1, 1000, compiler=no_compiler)
    with pytest.raises(ConfigError, match="true, false or auto"):
        decide("yes", "cpu", 1, 1000)


def test_a_resume_takes_the_recorded_choice_and_says_when_a_setting_overrides_it() -> None:
    assert decide("auto", "cpu", 3, 30_000, compiler=gxx, recorded=True).on  # far below the threshold: still on
    assert not decide("auto", "cpu", 10**9, M34, compiler=never_asked, recorded=False).on
    assert not decide("auto", "cuda", 10**9, M34, compiler=never_asked, recorded=False).on
    lost = decide("auto", "cpu", 3, M34, compiler=no_compiler, recorded=True)
    assert not lost.on and "not be bitwise" in lost.why
    override = decide(False, "cpu", 3, M34, compiler=never_asked, recorded=True)
    assert not override.on and "not be bitwise" in override.why
    assert "not be bitwise" not in decide(True, "cpu", 3, M34, compiler=gxx, recorded=True).why
    with pytest.raises(ConfigError):
        decide(True, "cpu", 3, M34, compiler=no_compiler, recorded=True)


def test_the_compiler_is_found_as_inductor_finds_it() -> None:
    import shutil

    from torch._inductor import config as inductor_config

    if shutil.which(os.environ.get("CXX", "g++")):
        assert cxx_compiler()
    with inductor_config.patch({"cpp.cxx": (None, "/nonexistent/preftune-test-cxx")}):
        assert cxx_compiler() is None
    assert inductor_config.cpp.cxx != (None, "/nonexistent/preftune-test-cxx")


def test_planned_steps_count_as_the_loop_does() -> None:
    assert planned_steps(TrainConfig(batch_size=8, grad_accum=2, epochs=3), 100) == 3 * 7  # 13 batches: 7 steps an epoch
    assert planned_steps(TrainConfig(batch_size=4, epochs=2), 100, processes=2) == 2 * 13
    assert planned_steps(TrainConfig(max_steps=5, epochs=9), 100) == 5


def test_an_older_checkpoint_without_the_record_ran_eagerly(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text(json.dumps({"step": 3}))
    assert recorded_choice(tmp_path) is False
    (tmp_path / STATE_FILE).write_text(json.dumps({"step": 3, "compiled": True}))
    assert recorded_choice(tmp_path) is True


COMMON = ["--train.save_every=null", "--train.eval_every=null", "--train.log_every=1", "--train.scheduler=constant",
          "--train.warmup_steps=0", "--train.batch_size=4"]


def test_the_checkpoint_records_the_choice_and_a_shorter_resume_keeps_it(
        tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A run planned long enough to compile (the threshold lowered to 4 steps, the layers' compilation
    stubbed) stops at step 2; resumed with max_steps=3 (a fresh run of 3 steps would stay eager) it
    still runs compiled, as recorded. An explicit false then overrides it, and says so."""
    asked: list[int] = []

    def fake_compile(model: torch.nn.Module) -> int:
        asked.append(id(model))
        return 2

    monkeypatch.setattr(compile_choice, "min_cpu_steps", lambda params: 4)
    monkeypatch.setattr(compile_choice, "compile_layers", fake_compile)
    monkeypatch.setattr(compile_choice, "cxx_compiler", gxx)
    monkeypatch.setattr("preftune.training.reference.compile_layers", fake_compile)
    train, _ = preference_files
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        run_dpo(dpo_config(tiny_model_dir, train, None, run, *COMMON, "--train.max_steps=6"), extra_terms=[sigint_at_step(2)])
    checkpoint = run / "checkpoints" / "step-2"
    assert json.loads((checkpoint / STATE_FILE).read_text())["compiled"] is True
    assert len(asked) == 2  # the policy, and the frozen reference copy
    assert "train.compile auto -> on (CPU, 6 planned steps >= 4 for a model of" in capsys.readouterr().err

    resumed = run_dpo(dpo_config(tiny_model_dir, train, None, run, *COMMON, "--train.max_steps=3", "--train.resume_from=latest"))
    assert len(asked) == 4
    err = capsys.readouterr().err
    assert "train.compile auto -> on (the checkpoint resumed from ran compiled)" in err
    assert [m["step"] for m in read_metrics(resumed)] == [1, 2, 3]

    fresh = run_dpo(dpo_config(tiny_model_dir, train, None, tmp_path / "fresh", *COMMON, "--train.max_steps=3",
                               "--train.save_every=3"))
    assert len(asked) == 4 and "train.compile auto -> off (CPU, 3 planned steps < 4" in capsys.readouterr().err
    assert json.loads((fresh / "checkpoints" / "step-3" / STATE_FILE).read_text())["compiled"] is False
    # the stub compiles nothing, so the weights are the eager ones: the resume continued the same run
    assert_same_weights(weights(fresh / "final"), weights(resumed / "final"), atol=0.0)

    run_dpo(dpo_config(tiny_model_dir, train, None, run, *COMMON, "--train.max_steps=4", "--train.resume_from=latest",
                       "--train.compile=false"))
    assert len(asked) == 4
    assert ("train.compile false -> off (set explicitly; the checkpoint resumed from ran compiled, so the result will not be "
            "bitwise the uninterrupted run's)") in capsys.readouterr().err


def test_an_older_checkpoint_resumes_eagerly(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(compile_choice, "min_cpu_steps", lambda params: 1)
    monkeypatch.setattr(compile_choice, "cxx_compiler", never_asked)
    train, _ = preference_files
    run = tmp_path / "run"
    run_dpo(dpo_config(tiny_model_dir, train, None, run, *COMMON, "--train.max_steps=1", "--train.save_every=1",
                       "--train.compile=false"))
    checkpoint = run / "checkpoints" / "step-1"
    state = json.loads((checkpoint / STATE_FILE).read_text())
    del state["compiled"]  # as written before the choice was recorded
    (checkpoint / STATE_FILE).write_text(json.dumps(state))
    write_manifest(checkpoint)
    capsys.readouterr()
    run_dpo(dpo_config(tiny_model_dir, train, None, run, *COMMON, "--train.max_steps=2", "--train.resume_from=latest"))
    assert "train.compile auto -> off (the checkpoint resumed from ran eagerly)" in capsys.readouterr().err


def test_compile_true_without_a_compiler_is_refused_before_training(
        tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Through the CLI, with inductor's compiler search pointed nowhere: exit status 2, one clear message,
    no traceback, the run folder left as it was (nothing trained)."""
    from torch._inductor import config as inductor_config

    from preftune.cli.main import main

    train, _ = preference_files
    out = tmp_path / "run"
    with inductor_config.patch({"cpp.cxx": (None, "/nonexistent/preftune-test-cxx")}):
        status = main(["dpo", str(REPO / "configs" / "dpo-tiny.yaml"), f"--model.path={tiny_model_dir}", f"--data.train={train}",
                       "--data.eval=[]", f"--train.output_dir={out}", "--train.max_steps=1", "--train.progress=false",
                       "--train.compile=true"])
    assert status == 2
    err = capsys.readouterr().err
    assert "train.compile=true, but inductor finds no C++ compiler" in err and "Traceback" not in err
    assert not out.exists()

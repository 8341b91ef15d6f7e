"""precision.py: ``train.bf16`` resolved once per run (the device's bf16 units, the model's size,
explicit values), said in one line, recorded in config.yaml, status.json and every checkpoint, and
taken over by a resume, also on a machine where auto would choose otherwise.

The suite fixes the processor's answer to "no bf16 units" (``PREFTUNE_CPU_BF16_UNITS=0`` in
conftest.py); the tests here set it as each case needs. A run with bf16 on is real bf16 autocast
(emulated on a processor without the units: the same rounding, only slower).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from conftest import assert_same_weights, dpo_config, read_metrics, sigint_at_step, weights
from preftune.errors import ConfigError
from preftune.stages.dpo import run as run_dpo
from preftune.system import hardware
from preftune.training import precision
from preftune.training.checkpoint import STATE_FILE, write_manifest
from preftune.training.interrupts import Interrupted
from preftune.training.precision import AUTO_MIN_PARAMS, decide, recorded_choice

AMX = (True, "CPU with AMX (amx_bf16)")
NONE = (False, "CPU without bf16 units (avx2; no amx_bf16 or avx512_bf16)")
DEMO, M34 = 180_000, 33_694_208  # the demo's model and the benchmark's (issue 21's two measured points)


def test_auto_needs_bf16_units_and_a_model_large_enough() -> None:
    assert not decide(None, "cpu", M34, units=NONE).bf16  # emulated bf16: slower at every size
    small = decide(None, "cpu", DEMO, units=AMX)
    assert not small.bf16 and small.line() == ("train.bf16 auto -> off (CPU with AMX (amx_bf16), but a model of 0.18M "
                                                "parameters < 5M: too small for bf16 to pay)")
    big = decide(None, "cpu", M34, units=AMX)
    assert big.bf16 and big.line() == "train.bf16 auto -> on (CPU with AMX (amx_bf16), a model of 33.69M parameters >= 5M)"
    assert decide(None, "cpu", AUTO_MIN_PARAMS, units=AMX).bf16 and not decide(None, "cpu", AUTO_MIN_PARAMS - 1, units=AMX).bf16
    assert not decide(None, "cpu", 30_000, units=AMX).bf16  # the tests' models stay fp32 on every processor
    assert decide(None, "cuda", M34, units=(True, "CUDA H200 (bf16 supported)")).bf16
    assert not decide(None, "cuda", DEMO, units=(True, "CUDA H200 (bf16 supported)")).bf16


def test_explicit_values_win_and_say_when_bf16_is_emulated() -> None:
    assert decide(True, "cpu", 30_000, units=AMX).line() == "train.bf16 true -> on (set explicitly)"
    emulated = decide(True, "cpu", M34, units=NONE)
    assert emulated.bf16 and "emulated and slower than fp32" in emulated.why
    assert decide(False, "cpu", M34, units=AMX).line() == "train.bf16 false -> off (set explicitly)"
    with pytest.raises(ConfigError, match=r"true, false or null \(auto\)"):
        decide("yes", "cpu", M34, units=AMX)  # type: ignore[arg-type]


def test_a_resume_keeps_the_recorded_precision_and_says_when_it_differs_from_auto() -> None:
    kept = decide(None, "cpu", DEMO, units=NONE, recorded=True)  # on another machine, where auto would choose fp32
    assert kept.bf16 and kept.why.startswith("the checkpoint resumed from ran bf16; auto would choose fp32 here (CPU without")
    assert "set train.bf16=false to change it" in kept.why
    assert decide(None, "cpu", M34, units=AMX, recorded=True).why == "the checkpoint resumed from ran bf16"
    assert not decide(None, "cpu", M34, units=AMX, recorded=False).bf16
    override = decide(False, "cpu", M34, units=AMX, recorded=True)
    assert not override.bf16 and "not be bitwise the uninterrupted run's" in override.why
    assert "not be bitwise" not in decide(True, "cpu", M34, units=AMX, recorded=True).why
    older = decide(None, "cpu", DEMO, units=AMX, resuming=True)  # a checkpoint that did not record it
    assert not older.bf16 and older.why.endswith("the checkpoint resumed from did not record its precision")


@pytest.mark.parametrize(("flags", "expected", "named"), [
    ({"avx2": True, "avx512f": True}, False, "CPU without bf16 units (avx512f;"),
    ({"avx512f": True, "avx512_bf16": True}, True, "CPU with avx512_bf16"),
    ({"amx_bf16": True, "amx_tile": True}, True, "CPU with AMX (amx_bf16)"),
])
def test_the_cpu_flags_name_the_units(monkeypatch: pytest.MonkeyPatch, flags: dict, expected: bool, named: str) -> None:
    monkeypatch.delenv(hardware.UNITS_ENV)
    fake = {**hardware.cpu_info(), "flags": {flag: flags.get(flag, False) for flag in hardware.CPU_FLAGS}}
    monkeypatch.setattr(hardware, "cpu_info", lambda: fake)
    has, what = hardware.bf16_units("cpu")
    assert has is expected and hardware.cpu_has_bf16_units() is expected and what.startswith(named)


def test_the_environment_fixes_what_detection_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    assert os.environ[hardware.UNITS_ENV] in ("0", "1")  # conftest fixed it for the whole run
    monkeypatch.setenv(hardware.UNITS_ENV, "1")
    assert hardware.cpu_has_bf16_units() and hardware.bf16_units("cpu") == (True, "CPU with bf16 units (as $PREFTUNE_CPU_BF16_UNITS=1 says)")
    monkeypatch.setenv(hardware.UNITS_ENV, "0")
    assert not hardware.cpu_has_bf16_units() and not hardware.bf16_units("cpu")[0]


def test_an_older_checkpoint_did_not_record_its_precision(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text(json.dumps({"step": 3}))
    assert recorded_choice(tmp_path) is None
    (tmp_path / STATE_FILE).write_text(json.dumps({"step": 3, "bf16": True}))
    assert recorded_choice(tmp_path) is True


COMMON = ["--train.save_every=null", "--train.eval_every=null", "--train.log_every=1", "--train.scheduler=constant",
          "--train.warmup_steps=0", "--train.batch_size=4", "--train.lr=1e-2"]


def recorded(run: Path) -> tuple[bool, dict, dict]:
    """(config.yaml's train.bf16, status.json's precision, the run's last checkpoint's state.json)."""
    steps = sorted((run / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((steps[-1] / STATE_FILE).read_text()) if steps else {}
    return (yaml.safe_load((run / "config.yaml").read_text())["train"]["bf16"], json.loads((run / "status.json").read_text())["precision"],
            state)


def test_a_run_says_its_precision_once_and_records_it(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """fp32 by auto on this test run's "no bf16 units": one line on stderr, and the resolved value in
    config.yaml, status.json (kept when the run finishes) and the checkpoint."""
    train, held = preference_files
    capsys.readouterr()
    run = run_dpo(dpo_config(tiny_model_dir, train, held, tmp_path / "run", *COMMON, "--train.max_steps=2", "--train.save_every=2"))
    lines = [line for line in capsys.readouterr().err.splitlines() if "train.bf16" in line]
    assert len(lines) == 1 and lines[0].startswith(f"preftune: dpo: model {tiny_model_dir} (")  # the run's start line says it
    assert "; train.bf16 auto -> off (CPU without bf16 units (as $PREFTUNE_CPU_BF16_UNITS=0 says)); train.compile auto -> off (" in lines[0]
    bf16, status, state = recorded(run)
    assert bf16 is False and state["bf16"] is False
    assert status == {"bf16": False, "setting": "auto", "why": "CPU without bf16 units (as $PREFTUNE_CPU_BF16_UNITS=0 says)"}
    assert json.loads((run / "status.json").read_text())["status"] == "finished"


def test_auto_turns_bf16_on_for_a_model_large_enough_and_a_resume_elsewhere_keeps_it(
        tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """With bf16 units (forced) and the threshold lowered under the tiny model, auto picks bf16: the
    reference cache is keyed by it, the loop runs in it (the logged log-probs differ from fp32's). The
    run stops at step 2; resumed on "another machine" without bf16 units, it keeps bf16, says so, and
    ends bitwise where the uninterrupted bf16 run ends."""
    monkeypatch.setattr(precision, "AUTO_MIN_PARAMS", 1000)
    monkeypatch.setenv(hardware.UNITS_ENV, "1")
    train, _ = preference_files
    cache = ["--reference.strategy=cache", f"--reference.cache_dir={tmp_path / 'cache'}"]
    capsys.readouterr()
    whole = run_dpo(dpo_config(tiny_model_dir, train, None, tmp_path / "whole", *COMMON, *cache, "--train.max_steps=4"))
    assert "train.bf16 auto -> on (CPU with bf16 units (as $PREFTUNE_CPU_BF16_UNITS=1 says), a model of" in capsys.readouterr().err
    assert recorded(whole)[1]["bf16"] is True and recorded(whole)[0] is True
    fp32 = run_dpo(dpo_config(tiny_model_dir, train, None, tmp_path / "fp32", *COMMON, *cache, "--train.max_steps=1", "--train.bf16=false"))
    assert read_metrics(fp32)[0]["logps/chosen"] != read_metrics(whole)[0]["logps/chosen"]  # bf16 really ran
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # one cache a precision

    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        run_dpo(dpo_config(tiny_model_dir, train, None, run, *COMMON, *cache, "--train.max_steps=4"), extra_terms=[sigint_at_step(2)])
    assert json.loads((run / "checkpoints" / "step-2" / STATE_FILE).read_text())["bf16"] is True
    monkeypatch.setenv(hardware.UNITS_ENV, "0")  # "another machine"
    capsys.readouterr()
    resumed = run_dpo(dpo_config(tiny_model_dir, train, None, run, *COMMON, *cache, "--train.max_steps=4", "--train.resume_from=latest"))
    err = capsys.readouterr().err
    assert "train.bf16 auto -> on (the checkpoint resumed from ran bf16; auto would choose fp32 here (CPU without" in err
    assert recorded(resumed)[1]["bf16"] is True
    assert [m["step"] for m in read_metrics(resumed)] == [1, 2, 3, 4]
    assert_same_weights(weights(whole / "final"), weights(resumed / "final"), atol=0.0)


def test_an_older_checkpoint_is_decided_afresh(tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    train, _ = preference_files
    run = tmp_path / "run"
    run_dpo(dpo_config(tiny_model_dir, train, None, run, *COMMON, "--train.max_steps=1", "--train.save_every=1"))
    checkpoint = run / "checkpoints" / "step-1"
    state = json.loads((checkpoint / STATE_FILE).read_text())
    del state["bf16"]  # as written before the choice was recorded
    (checkpoint / STATE_FILE).write_text(json.dumps(state))
    write_manifest(checkpoint)
    capsys.readouterr()
    run_dpo(dpo_config(tiny_model_dir, train, None, run, *COMMON, "--train.max_steps=2", "--train.resume_from=latest"))
    assert "the checkpoint resumed from did not record its precision" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_every_stage_says_and_records_its_precision(stage: str, tiny_model_dir: Path, preference_files: tuple[Path, Path],
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The stages whose loop resolves the precision (no reference to build first) record it the same way."""
    import preftune

    train, _ = preference_files
    records = [json.loads(line) for line in train.read_text().splitlines()][:8]
    if stage == "sft":
        records = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in records]
    fn = {"sft": preftune.sft, "rm": preftune.reward_model}[stage]
    capsys.readouterr()
    result = fn(str(tiny_model_dir), train_data=records, output_dir=str(tmp_path / stage), batch_size=4, max_steps=1,
                progress=False, report=False, bf16=True)
    assert "train.bf16 true -> on (set explicitly; CPU without bf16 units" in capsys.readouterr().err
    bf16, status, _ = recorded(result.run_dir)
    assert bf16 is True and status["bf16"] is True and status["setting"] is True

"""interrupts.py and the loop's stops: SIGTERM and SIGINT end a run after the current step with a
checkpoint, one line saying where, and the shell's exit status (143, 130); the run resumes to the
weights of an uninterrupted one. A resume under another config is refused before anything is
written.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import DPO_TINY, assert_same_weights, dpo_config, read_metrics, sigint_at_step, start_cli, weights
from preftune.errors import TrainingError
from preftune.stages.dpo import run as run_dpo
from preftune.training.interrupts import Interrupted

#: a run whose config differs from the resumed and the straight one in max_steps only (a resume may change it)
COMMON = ["--train.deterministic=true", "--train.save_every=null", "--train.eval_every=null", "--train.log_every=1",
          "--train.scheduler=constant", "--train.warmup_steps=0", "--train.batch_size=4"]


@pytest.mark.full
@pytest.mark.slow
def test_sigterm_checkpoints_says_where_exits_143_and_resumes_to_the_same_weights(
        tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    train, _ = preference_files
    out = tmp_path / "stopped"
    args = [str(DPO_TINY), f"--model.path={tiny_model_dir}", f"--data.train={train}", "--data.eval=[]", f"--train.output_dir={out}",
            "--train.progress=false", "--train.report=false", "--train.max_steps=100000", *COMMON]
    proc = start_cli("dpo", *args, env={"OMP_NUM_THREADS": str(torch.get_num_threads())})
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    step = read_metrics(out)[-1]["step"]
    checkpoint = out / "checkpoints" / f"step-{step}"
    lines = [line for line in err.splitlines() if "SIGTERM" in line]
    assert lines == [f"preftune: stopped by SIGTERM after step {step}: checkpoint '{checkpoint}'; continue with "
                     "--train.resume_from=latest and the same config."]
    assert (checkpoint / "manifest.json").is_file() and not (out / "final").exists()
    assert json.loads((out / "status.json").read_text())["status"] == "failed"

    finish = [*COMMON, f"--train.max_steps={step + 2}"]
    resumed = run_dpo(dpo_config(tiny_model_dir, train, None, out, *finish, "--train.resume_from=latest"))
    straight = run_dpo(dpo_config(tiny_model_dir, train, None, tmp_path / "straight", *finish))
    assert_same_weights(weights(straight / "final"), weights(resumed / "final"), atol=0.0)
    assert [m["step"] for m in read_metrics(resumed)] == list(range(1, step + 3))


def test_sigint_stops_after_the_step_with_a_checkpoint_and_status_130(
        tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    train, _ = preference_files
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted, match=r"stopped by SIGINT after step 3: checkpoint '.*step-3'") as stop:
        run_dpo(dpo_config(tiny_model_dir, train, None, tmp_path / "run", *COMMON, "--train.max_steps=6"),
                extra_terms=[sigint_at_step(3)])
    assert stop.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is handler  # the loop's handlers are gone with it
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]
    resumed = run_dpo(dpo_config(tiny_model_dir, train, None, tmp_path / "run", *COMMON, "--train.max_steps=6",
                                 "--train.resume_from=latest"))
    straight = run_dpo(dpo_config(tiny_model_dir, train, None, tmp_path / "straight", *COMMON, "--train.max_steps=6"))
    assert_same_weights(weights(straight / "final"), weights(resumed / "final"), atol=0.0)


def test_a_resume_under_another_config_is_refused_and_changes_nothing(
        tiny_model_dir: Path, preference_files: tuple[Path, Path], tmp_path: Path) -> None:
    train, _ = preference_files
    run = tmp_path / "run"
    run_dpo(dpo_config(tiny_model_dir, train, None, run, *COMMON, "--train.max_steps=2", "--train.save_every=1"))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(TrainingError, match=r"another config.*loss.beta \(0.1 -> 0.3\); train.lr \(0.001 -> 0.01\)"):
        run_dpo(dpo_config(tiny_model_dir, train, None, run, *COMMON, "--train.max_steps=4", "--train.save_every=1",
                           "--train.resume_from=latest", "--train.lr=1e-2", "--loss.beta=0.3"))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # a damaged newest checkpoint is passed over; an explicit path to it is refused
    (run / "checkpoints" / "step-2" / "weights.safetensors").write_bytes(b"not the saved weights")
    with pytest.raises(TrainingError, match=r"step-2' is not resumed from: 'weights.safetensors' has 21 bytes"):
        run_dpo(dpo_config(tiny_model_dir, train, None, run, *COMMON, "--train.max_steps=4",
                           f"--train.resume_from={run / 'checkpoints' / 'step-2'}"))
    resumed = run_dpo(dpo_config(tiny_model_dir, train, None, run, *COMMON, "--train.max_steps=3", "--train.resume_from=latest"))
    assert [m["step"] for m in read_metrics(resumed)] == [1, 2, 3]


def test_a_repeat_within_the_grace_period_is_the_same_stop_and_a_later_one_stops_at_once_naming_it() -> None:
    from preftune.training.interrupts import StoppedAtOnce, StopSignals

    with StopSignals() as signals:  # the launcher forwarding the group's SIGTERM a moment later: the same stop
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.pending() == signal.SIGTERM and signals.name == "SIGTERM"
    with pytest.raises(StoppedAtOnce) as stop, StopSignals(grace=0.0):  # a second signal after the grace period
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
    assert stop.value.signum == signal.SIGTERM and isinstance(stop.value, KeyboardInterrupt)

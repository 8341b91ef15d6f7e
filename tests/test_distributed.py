"""Data-parallel training on this machine: CPU, gloo, launched with torchrun.

Two processes with a global batch of 8 (4 each) give the losses at every step and the final
weights of one process with batch 8, data-parallel (DDP) and sharded (train.sharding=fsdp:
torch's FSDP2, each process holding half of the parameters, gradients and AdamW state; LoRA
too, its frozen base sharded and its reference the adapter switched off); a run
stopped and resumed on two processes (or resumed on one with the same global batch) ends the
same, a sharded one stopped by a SIGTERM to the whole launch included; two "nodes" on one
machine give the result of two processes on one node; what is not supported is refused in one line.

Marked fp32_exact (run again by `make test-all` as on a CPU with bf16 units): one data-parallel and
one sharded launch. train.bf16 auto is decided once, on the main process, and broadcast
(system.distributed.decided_on_main), so every other launch here takes the same path; running
them all twice would cost CI minutes and check nothing more.

Launches are what this file costs (a fresh interpreter per process, torch imported in each): a
single process runs in this one (preftune's CLI called in-process), and launches that would repeat
one another's setup are shared (the two-process DPO run is the reference of the two-node run and
the uninterrupted end of the stopped one). Every launch must exit 0: a finished launch reported
failed (a process ending on SIGABRT in its teardown) fails the test that made it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DPO_TINY, REPO, assert_same_weights, read_metrics, weights, write_jsonl
from preftune.cli.main import main

pytestmark = pytest.mark.full
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
QUIET = ["--train.progress=false", "--train.report=false", "--train.log_every=1", "--train.lr=1e-3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


def preftune(*args: str, processes: int = 1, nodes: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """`preftune ARGS` in one process (this one: the CLI called in-process), or launched by torchrun
    (processes per node, nodes on this machine)."""
    if processes == 1 and nodes == 1:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(list(args))
        results = [subprocess.CompletedProcess(args, code, "", err.getvalue())]
    else:
        port = free_port()
        command = [[*TORCHRUN, f"--nnodes={nodes}", f"--nproc-per-node={processes}", f"--node-rank={node}",
                    "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "preftune.cli", *args] for node in range(nodes)]
        running = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()) for c in command]
        results = []
        for p in running:
            out, err = p.communicate(timeout=600)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    if check:  # every node's launch: exit 0, and no process ended in std::terminate
        for r in results:
            assert r.returncode == 0, r.stderr[-3000:]
            assert "terminate called" not in r.stderr, r.stderr[-3000:]
    return results[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from preftune.models.tiny import synthetic_preferences

    folder = tmp_path_factory.mktemp("dp-data")
    return write_jsonl(folder / "train.jsonl", synthetic_preferences(48, seed=1)), write_jsonl(folder / "eval.jsonl",
                                                                                          synthetic_preferences(10, seed=2))


def dpo(model: Path, data: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    return ["dpo", str(DPO_TINY), f"--model.path={model}", f"--data.train={data[0]}", f"--data.eval={data[1]}",
            f"--train.output_dir={out}", "--train.save_every=null", "--train.eval_every=3", *QUIET, *extra]


def assert_same_runs(a: Path, b: Path) -> None:
    lines_a, lines_b = read_metrics(a), read_metrics(b)
    assert [m["step"] for m in lines_a] == [m["step"] for m in lines_b]
    for x, y in zip(lines_a, lines_b):
        for key in ("loss", "eval/loss", "rewards/margins", "grad_norm", "nll"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-5), (x["step"], key)
        if "num_tokens" in x:
            assert x["num_tokens"] == y["num_tokens"]  # every example trained on once: none twice
    assert_same_weights(weights(a / "final"), weights(b / "final"), atol=1e-5)


CONSTANT = ["--train.scheduler=constant", "--train.warmup_steps=0", "--train.save_every=3"]


@pytest.fixture(scope="module")
def dpo_runs(tiny_model_dir: Path, data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """DPO for 6 steps with prefix sharing, a constant learning rate and a checkpoint every 3 steps:
    one process with batch 8 ("one") and two processes with batch 4 each ("two", its stderr beside it)."""
    folder = tmp_path_factory.mktemp("dpo-runs")
    preftune(*dpo(tiny_model_dir, data, folder / "one", "--train.max_steps=6", "--train.batch_size=8", *CONSTANT))
    two = preftune(*dpo(tiny_model_dir, data, folder / "two", "--train.max_steps=6", "--train.batch_size=4", *CONSTANT), processes=2)
    (folder / "two.stderr").write_text(two.stderr)
    return {"one": folder / "one", "two": folder / "two", "two.stderr": folder / "two.stderr"}


@pytest.mark.fp32_exact
def test_two_processes_equal_one_for_dpo_with_prefix_sharing(dpo_runs: dict[str, Path]) -> None:
    stderr = dpo_runs["two.stderr"].read_text()
    assert "2 processes x batch 4 x grad_accum 1 = global batch 8" in stderr
    assert stderr.count("train.compile auto -> off (CPU, 6 planned steps < ") == 1  # decided once, for both
    assert json.loads((dpo_runs["two"] / "reference.json").read_text())["layout"] == "prefix_shared"
    assert_same_runs(dpo_runs["one"], dpo_runs["two"])


def test_two_processes_equal_one_for_sft_with_accumulation(tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    def sft(out: Path, batch: int) -> list[str]:
        return ["sft", str(REPO / "configs" / "sft-tiny.yaml"), f"--model.path={tiny_model_dir}", f"--data.train={data[0]}",
                f"--data.eval={data[1]}", f"--train.output_dir={out}", "--train.max_steps=4", "--train.grad_accum=2",
                f"--train.batch_size={batch}", "--train.save_every=null", "--train.eval_every=null", *QUIET]

    preftune(*sft(tmp_path / "one", 4))
    two = preftune(*sft(tmp_path / "two", 2), processes=2)
    assert two.stderr.count("train.compile auto -> off (CPU, 4 planned steps < ") == 1  # the loop decides for sft
    assert_same_runs(tmp_path / "one", tmp_path / "two")


def test_a_stopped_two_process_run_resumes_to_the_same_end(tiny_model_dir: Path, data: tuple[Path, Path], dpo_runs: dict[str, Path],
                                                          tmp_path: Path) -> None:
    import shutil

    straight = dpo_runs["two"] / "final"  # 6 steps on two processes, uninterrupted
    preftune(*dpo(tiny_model_dir, data, tmp_path / "stopped", "--train.max_steps=3", "--train.batch_size=4", *CONSTANT), processes=2)
    rng = __import__("torch").load(tmp_path / "stopped" / "checkpoints" / "step-3" / "rng.pt", weights_only=True)
    assert len(rng["ranks"]) == 2  # every process's RNG
    shutil.copytree(tmp_path / "stopped", tmp_path / "one")
    resumed = dpo(tiny_model_dir, data, tmp_path / "stopped", "--train.max_steps=6", "--train.resume_from=latest", *CONSTANT)
    preftune(*resumed, "--train.batch_size=4", processes=2)
    assert_same_weights(weights(straight), weights(tmp_path / "stopped" / "final"), atol=1e-5)
    # one process with the same global batch continues the same data position
    preftune(*dpo(tiny_model_dir, data, tmp_path / "one", "--train.max_steps=6", "--train.resume_from=latest", "--train.batch_size=8",
                  *CONSTANT))
    assert_same_weights(weights(straight), weights(tmp_path / "one" / "final"), atol=1e-5)
    # another global batch would point at other examples: refused
    refused = preftune(*dpo(tiny_model_dir, data, tmp_path / "one", "--train.max_steps=9", "--train.resume_from=latest",
                            "--train.batch_size=4", *CONSTANT), check=False)
    assert refused.returncode == 2 and "global batch of 8" in refused.stderr and "this run has 4" in refused.stderr


def test_two_processes_equal_one_for_kto_with_the_global_kl_baseline_data_parallel_and_sharded(
        tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    def kto(out: Path, batch: int) -> list[str]:  # lr 1e-2: a per-process z0 moved the weights by 2e-4 here
        return ["kto", str(REPO / "configs" / "kto-tiny.yaml"), f"--model.path={tiny_model_dir}", f"--data.train={data[0]}",
                "--kto.split_pairs=true", f"--train.output_dir={out}", "--train.max_steps=4", f"--train.batch_size={batch}",
                "--train.save_every=null", "--train.eval_every=null", *QUIET, "--train.lr=1e-2"]

    preftune(*kto(tmp_path / "one", 8))
    kl_one = [m["kl"] for m in read_metrics(tmp_path / "one")]
    assert max(kl_one) > 1e-3  # the baseline is in play
    for name, extra in (("two", []), ("sharded", ["--train.sharding=fsdp"])):
        preftune(*kto(tmp_path / name, 4), *extra, processes=2)
        assert_same_runs(tmp_path / "one", tmp_path / name)
        assert [m["kl"] for m in read_metrics(tmp_path / name)] == pytest.approx(kl_one, rel=1e-5, abs=1e-7)  # global


def held_mib(stderr: str) -> list[float]:
    """Each process's MiB of trained parameters, gradients and AdamW state, as the sharded run's line says."""
    line = next(line for line in stderr.splitlines() if line.startswith("preftune: sharded (FSDP2) over"))
    return [float(x) for x in line.split("each holds ")[1].split(" MiB")[0].split(", ")] + [float(line.split("unsharded: ")[1].split()[0])]


@pytest.mark.fp32_exact
def test_two_sharded_processes_equal_one_for_dpo_with_a_copied_and_a_cached_reference(
        tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    for strategy in ("copy", "cache"):
        ref = [f"--reference.strategy={strategy}", "--train.max_steps=4"]
        preftune(*dpo(tiny_model_dir, data, tmp_path / f"one-{strategy}", *ref, "--train.batch_size=8",
                      f"--reference.cache_dir={tmp_path / 'cache-one'}"))
        two = preftune(*dpo(tiny_model_dir, data, tmp_path / f"two-{strategy}", *ref, "--train.batch_size=4", "--train.sharding=fsdp",
                            f"--reference.cache_dir={tmp_path / 'cache-two'}"), processes=2)
        assert "= global batch 8 per optimizer step (sharded: FSDP2)" in two.stderr
        *each, whole = held_mib(two.stderr)
        assert len(each) == 2 and all(0.4 * whole <= held <= 0.6 * whole for held in each), two.stderr  # half each
        assert_same_runs(tmp_path / f"one-{strategy}", tmp_path / f"two-{strategy}")  # eval included: balanced batches
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "two-copy" / "final")  # the gathered model, whole
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())


def test_two_sharded_processes_equal_one_for_lora_dpo_with_the_adapter_off_reference(
        tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    """LoRA under FSDP2: the frozen base sharded beside the adapters, the reference the sharded policy with its
    adapter off; final/ holds the adapter (PeftModel.from_pretrained loads it) and merged/ the merged weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = ["--model.lora.enabled=true", "--model.lora.merge_on_save=true", "--reference.strategy=auto", "--train.max_steps=4",
            "--train.lr=1e-2"]
    preftune(*dpo(tiny_model_dir, data, tmp_path / "one", *lora, "--train.batch_size=8"))
    two = preftune(*dpo(tiny_model_dir, data, tmp_path / "two", *lora, "--train.batch_size=4", "--train.sharding=fsdp"), processes=2)
    assert json.loads((tmp_path / "two" / "reference.json").read_text())["adapter"].startswith("off")
    *each, whole = held_mib(two.stderr)  # the adapters' parameters, gradients and AdamW state, halved
    assert all(0.4 * whole <= held <= 0.6 * whole for held in each), two.stderr
    assert_same_runs(tmp_path / "one", tmp_path / "two")  # the adapter's weights (final/*.safetensors)
    assert_same_weights(weights(tmp_path / "one" / "final" / "merged"), weights(tmp_path / "two" / "final" / "merged"), atol=1e-5)
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "two" / "final")
    assert any("lora_B" in name and bool(p.ne(0).any()) for name, p in policy.named_parameters())  # trained, loaded


def test_two_sharded_processes_equal_one_for_sft_with_packing_and_the_reward_model(
        tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    from preftune.models.reward import load_reward_model

    def stage(verb: str, out: Path, batch: int, *extra: str) -> list[str]:
        return [verb, str(REPO / "configs" / f"{verb}-tiny.yaml"), f"--model.path={tiny_model_dir}", f"--data.train={data[0]}",
                f"--train.output_dir={out}", "--train.max_steps=3", f"--train.batch_size={batch}", "--train.save_every=null",
                "--train.eval_every=null", *QUIET, *extra]

    held_out = f"--data.eval={data[1]}"
    runs = {"sft": ["--sft.packing=true", "--train.grad_accum=2", held_out], "rm": [held_out]}
    for verb, extra in runs.items():
        preftune(*stage(verb, tmp_path / f"one-{verb}", 8, *extra))
        two = preftune(*stage(verb, tmp_path / f"two-{verb}", 4, *extra, "--train.sharding=fsdp"), processes=2)
        *each, whole = held_mib(two.stderr)
        assert all(0.4 * whole <= held <= 0.6 * whole for held in each), (verb, two.stderr)
        assert_same_runs(tmp_path / f"one-{verb}", tmp_path / f"two-{verb}")
    model, _ = load_reward_model(tmp_path / "two-rm" / "final")  # the gathered reward model: backbone and head
    one, _ = load_reward_model(tmp_path / "one-rm" / "final")
    assert_same_weights(model.state_dict(), one.state_dict(), atol=1e-5)


def stop_by_sigterm(args: list[str], out: Path) -> tuple[int, str]:
    """Launch ``preftune ARGS`` in 2 processes, send SIGTERM to the whole launch (as `timeout` or a
    scheduler does) once 2 steps are logged; (the step its checkpoint is at, stderr)."""
    command = [*TORCHRUN, "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "preftune.cli", *args]
    launch = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), start_new_session=True)
    deadline = time.monotonic() + 300
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
        assert launch.poll() is None and time.monotonic() < deadline, launch.communicate()
        time.sleep(0.2)
    os.killpg(launch.pid, signal.SIGTERM)
    _, err = launch.communicate(timeout=300)
    stops = [line for line in err.splitlines() if line.startswith("preftune: stopped by")]
    assert len(stops) == 1 and "stopped by SIGTERM after step" in stops[0], err[-3000:]  # once per launch, naming the signal
    step = int(stops[0].split("after step ")[1].split(":")[0])
    assert (out / "checkpoints" / f"step-{step}" / "manifest.json").is_file(), err[-3000:]
    return step, err


def test_a_sharded_run_stopped_by_sigterm_resumes_on_two_processes_bitwise_and_on_one(
        tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    constant = ["--train.scheduler=constant", "--train.warmup_steps=0", "--train.eval_every=null", "--data.eval=[]"]
    sharded = [*constant, "--train.batch_size=4", "--train.sharding=fsdp"]
    step, _ = stop_by_sigterm(dpo(tiny_model_dir, data, tmp_path / "stopped", "--train.max_steps=100000", *sharded), tmp_path / "stopped")
    checkpoint = tmp_path / "stopped" / "checkpoints" / f"step-{step}"
    parts = json.loads((checkpoint / "manifest.json").read_text())["files"]
    assert {"sharded/__0_0.distcp", "sharded/__1_0.distcp", "sharded/.metadata", "model.safetensors"} <= set(parts)  # each rank's part
    shutil.copytree(tmp_path / "stopped", tmp_path / "one")
    finish = [f"--train.max_steps={step + 2}", "--train.resume_from=latest"]
    preftune(*dpo(tiny_model_dir, data, tmp_path / "stopped", *sharded, *finish), processes=2)
    preftune(*dpo(tiny_model_dir, data, tmp_path / "straight", *sharded, f"--train.max_steps={step + 2}"), processes=2)
    assert_same_weights(weights(tmp_path / "straight" / "final"), weights(tmp_path / "stopped" / "final"), atol=0.0)
    # one process, unsharded, with the same global batch: DCP reshards the checkpoint
    preftune(*dpo(tiny_model_dir, data, tmp_path / "one", *constant, "--train.batch_size=8", "--train.sharding=none", *finish))
    assert_same_weights(weights(tmp_path / "straight" / "final"), weights(tmp_path / "one" / "final"), atol=1e-5)


def test_two_nodes_on_one_machine_equal_two_processes(tiny_model_dir: Path, data: tuple[Path, Path], dpo_runs: dict[str, Path],
                                                      tmp_path: Path) -> None:
    preftune(*dpo(tiny_model_dir, data, tmp_path / "nodes", "--train.max_steps=6", "--train.batch_size=4", *CONSTANT), processes=1, nodes=2)
    assert_same_runs(dpo_runs["two"], tmp_path / "nodes")


def test_what_is_not_supported_is_refused_in_one_line(tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    report = preftune("report", str(tmp_path), processes=2, check=False)
    assert report.returncode != 0 and report.stderr.count("`preftune report` runs in one process; it was launched in 2") == 1
    os.environ["ACCELERATE_USE_FSDP"] = "true"
    try:
        fsdp = preftune(*dpo(tiny_model_dir, data, tmp_path / "fsdp", "--train.max_steps=1"), check=False)
    finally:
        del os.environ["ACCELERATE_USE_FSDP"]
    assert fsdp.returncode == 2 and "train.sharding=fsdp: it needs several processes" in fsdp.stderr and "Traceback" not in fsdp.stderr
    odd = write_jsonl(tmp_path / "nine.jsonl", [json.loads(line) for line in data[0].read_text().splitlines()[:9]])
    uneven = preftune(*dpo(tiny_model_dir, (odd, data[1]), tmp_path / "odd", "--train.max_steps=1", "--train.batch_size=4"),
                      processes=2, check=False)
    assert uneven.returncode != 0 and "leave a last batch of 1 for 2 processes" in uneven.stderr

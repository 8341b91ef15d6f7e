"""The shipped accelerate configs (configs/accelerate/): each parses with accelerate's own config
loader (no deepspeed needed), and a launch in a mode preftune does not support yet is refused at
start in one line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import REPO, run_python

CONFIGS = REPO / "configs" / "accelerate"
#: file -> (accelerate's distributed_type, what else it must say)
EXPECTED = {"ddp.yaml": ("MULTI_GPU", {}), "fsdp.yaml": ("FSDP", {"fsdp_version": 2, "fsdp_reshard_after_forward": True,
                                                                  "fsdp_state_dict_type": "FULL_STATE_DICT"}),
            "zero2.yaml": ("DEEPSPEED", {"zero_stage": 2}), "zero3.yaml": ("DEEPSPEED", {"zero_stage": 3})}
#: distributed_type -> the variable `accelerate launch` sets for it (accelerate/utils/launch.py)
LAUNCH_ENV = {"FSDP": "ACCELERATE_USE_FSDP", "DEEPSPEED": "ACCELERATE_USE_DEEPSPEED"}


def test_every_shipped_config_is_tested() -> None:
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerates_loader(name: str) -> None:
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(CONFIGS / name))
    kind, settings = EXPECTED[name]
    assert isinstance(config, ClusterConfig) and config.distributed_type.value == kind and config.num_processes >= 2
    section = config.fsdp_config if kind == "FSDP" else config.deepspeed_config
    for key, value in settings.items():
        assert section[key] == value, (name, key)


def dpo_args(model: Path, data: Path, out: Path) -> list[str]:
    return ["-m", "preftune.cli", "dpo", str(REPO / "configs" / "dpo-tiny.yaml"), f"--model.path={model}", f"--data.train={data}",
            f"--train.output_dir={out}", "--train.max_steps=1"]


def assert_refused_in_one_line(run: subprocess.CompletedProcess, variable: str, out: Path) -> None:
    lines = [line for line in run.stderr.splitlines() if "not supported yet" in line]
    assert run.returncode != 0 and len(lines) == 1 and variable in lines[0], run.stderr[-2000:]
    assert lines[0].startswith("preftune: error:") and not (out / "final").exists()


@pytest.mark.full
@pytest.mark.slow
def test_accelerate_launch_with_the_fsdp_config_trains_sharded_and_says_so(tiny_model_dir: Path, preference_files: tuple[Path, Path],
                                                                          tmp_path: Path) -> None:
    """The real launcher with the shipped config, two processes on this CPU (gloo): torch's FSDP2, not a refusal."""
    out = tmp_path / "run"
    run = run_python("-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "fsdp.yaml"),
                     "--num_processes", "2", *dpo_args(tiny_model_dir, preference_files[0], out), "--train.save_every=null",
                     "--train.batch_size=4", "--data.eval=[]", "--train.progress=false", "--train.report=false",
                     timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("preftune: accelerate launch asked for FSDP (ACCELERATE_USE_FSDP): train.sharding=fsdp") == 1
    assert "(sharded: FSDP2)" in run.stderr and "preftune: sharded (FSDP2) over 2 processes" in run.stderr
    assert "sharding: fsdp" in (out / "config.yaml").read_text() and (out / "final" / "model.safetensors").is_file()


@pytest.mark.full
@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero2.yaml", "zero3.yaml"])
def test_a_deepspeed_launch_is_refused_in_one_line(name: str, tiny_model_dir: Path, preference_files: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    """`accelerate launch` with a DeepSpeed config stops before preftune where deepspeed is not installed (here);
    where it is, the launcher sets the variable of the config's distributed_type: preftune then refuses."""
    from accelerate.commands.config.config_args import load_config_from_file

    variable = LAUNCH_ENV[load_config_from_file(str(CONFIGS / name)).distributed_type.value]
    run = run_python(*dpo_args(tiny_model_dir, preference_files[0], tmp_path / "run"), timeout=300, env={variable: "true"})
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert_refused_in_one_line(run, variable, tmp_path / "run")

"""The lock file (tools/lock.py, requirements.lock): what `make` installs is pinned, the pins satisfy
pyproject.toml's ranges, and a missing or damaged lock stops `make` in one line that says how to
regenerate it, before anything is installed."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import REPO

LOCK = REPO / "requirements.lock"
_spec = importlib.util.spec_from_file_location("lock", REPO / "tools" / "lock.py")
lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock)

FROZEN = "torch==2.13.0+cpu\ntransformers==5.25.0\npeft==0.22.0\naccelerate==1.16.0\ndatasets==5.2.0\ntrl==1.16.0\npytest==9.2.0\n"


def pins(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return {lock._name(line): line.split("==", 1)[1] for line in lines}


def test_the_committed_lock_is_intact_and_satisfies_every_declared_range() -> None:
    assert lock.problem(LOCK) is None
    pinned = pins(LOCK)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    for requirement in declared:
        name = lock._name(requirement.name)
        assert name in pinned, f"{requirement} is declared but not locked: run `make lock`"
        assert requirement.specifier.contains(Version(pinned[name]), prereleases=True), \
            f"the lock pins {name}=={pinned[name]}, outside pyproject.toml's {requirement}: run `make lock`"


def test_a_written_lock_is_sorted_with_torch_free_of_its_local_label(tmp_path: Path) -> None:
    path = tmp_path / "requirements.lock"
    lock.write(path, "pytest==9.2.0\n" + FROZEN.replace("pytest==9.2.0\n", "") + "Zeta_Pkg==1.0\n")
    assert lock.problem(path) is None
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    assert "torch==2.13.0" in lines and lines == sorted(lines, key=lock._name)
    with pytest.raises(SystemExit, match="not name==version: '-e git"):
        lock.pins_of("-e git+https://example.invalid/x.git#egg=x\n")


@pytest.mark.parametrize(("damage", "why"), [
    (lambda text: text.replace("peft==0.22.0", "peft==0.21.0"), "its pins do not match its sha256 line"),
    (lambda text: text.replace("peft==0.22.0", "peft>=0.22"), "is not name==version: 'peft>=0.22'"),
    (lambda text: "\n".join(line for line in text.splitlines() if not line.startswith("# sha256")), "no sha256 line"),
    (lambda text: text[: text.index("torch==")], "its pins do not match its sha256 line"),  # cut short
])
def test_a_damaged_lock_is_named_with_what_is_wrong(tmp_path: Path, damage, why: str) -> None:  # noqa: ANN001
    path = tmp_path / "requirements.lock"
    lock.write(path, FROZEN)
    path.write_text(damage(path.read_text()))
    assert why in lock.problem(path)


def test_a_lock_without_the_core_libraries_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "requirements.lock"
    lock.write(path, "torch==2.13.0\nrequests==2.0\n")
    assert "no pin for transformers, peft, accelerate, datasets, trl, pytest" in lock.problem(path)


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
@pytest.mark.parametrize("state", ["missing", "damaged"])
def test_make_stops_in_one_line_before_installing_anything(tmp_path: Path, state: str) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\nexit 99\n")  # never reached: an install would fail loudly
    (venv / "bin" / "python").chmod(0o755)
    bad = tmp_path / "requirements.lock"
    if state == "damaged":
        bad.write_text(LOCK.read_text().replace("==", "= =", 1))
    done = subprocess.run(["make", "-s", "-C", str(REPO), "install", f"LOCK={bad}", f"VENV={venv}"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{bad} is {state}" in lines[0] and "regenerate it with `make lock`" in lines[0], done.stderr
    assert not (venv / ".preftune-installed").exists()

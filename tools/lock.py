"""The lock file: every package that ``make`` installs, pinned, in pip's constraints format.

``make lock`` pipes ``pip freeze`` of a fresh environment through ``lock.py write``; every
``make`` target that installs runs ``lock.py check`` first, and stops with one line when the
file is missing or damaged, rather than install unpinned. Standard library only: it runs before
any environment exists.

    python tools/lock.py write requirements.lock < frozen.txt
    python tools/lock.py check requirements.lock
"""

from __future__ import annotations

import hashlib
import platform
import re
import sys
from datetime import date
from pathlib import Path

#: one pin a line: ``name==version`` (a name as PyPI spells it, a PEP 440 version)
PIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9][A-Za-z0-9.+!_-]*$")
DIGEST = "# sha256 of the pins below: "
#: what the project cannot run without: a lock without these is not a lock of this project
REQUIRED = ("torch", "transformers", "peft", "accelerate", "datasets", "trl", "pytest")
REGENERATE = "regenerate it with `make lock` (then run `make test-all` on it)"


def _digest(pins: list[str]) -> str:
    return hashlib.sha256("\n".join(pins).encode()).hexdigest()


def _name(pin: str) -> str:
    return re.sub(r"[-_.]+", "-", pin.split("==", 1)[0]).lower()


def pins_of(frozen: str) -> list[str]:
    """The pins of ``pip freeze`` output, sorted by name. torch keeps no local label (``+cpu``):
    the Makefile installs it first from whichever index the machine needs, and ``torch==2.13.0``
    admits each build of that release."""
    pins = []
    for line in frozen.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not PIN.match(line):
            raise SystemExit(f"lock.py: pip freeze gave a line that is not name==version: {line!r}")
        if _name(line) == "torch":
            line = line.split("+", 1)[0]
        pins.append(line)
    return sorted(pins, key=_name)


def write(path: Path, frozen: str) -> None:
    pins = pins_of(frozen)
    header = [
        "# Every package that `make` installs, pinned (pip's constraints format). Made by `make lock`",
        f"# from pyproject.toml's ranges on {date.today().isoformat()}, Python {platform.python_version()};"
        " change it only that way, then run `make test-all`.",
        DIGEST + _digest(pins),
    ]
    path.write_text("\n".join(header + pins) + "\n")
    print(f"lock.py: {path} pins {len(pins)} packages")


def problem(path: Path) -> str | None:
    """Why ``path`` is not a usable lock, or None."""
    if not path.is_file():
        return "is missing"
    lines = path.read_text(errors="replace").splitlines()
    stated = [line[len(DIGEST):].strip() for line in lines if line.startswith(DIGEST)]
    pins = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    bad = [(n, line) for n, line in enumerate(lines, 1) if line.strip() and not line.startswith("#") and not PIN.match(line.strip())]
    if bad:
        return f"is damaged (line {bad[0][0]} is not name==version: {bad[0][1][:60]!r})"
    if len(stated) != 1:
        return "is damaged (no sha256 line)"
    if stated[0] != _digest(pins):
        return "is damaged (its pins do not match its sha256 line: edited by hand or cut short)"
    missing = [name for name in REQUIRED if name not in {_name(pin) for pin in pins}]
    if missing:
        return f"is damaged (no pin for {', '.join(missing)})"
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("write", "check"):
        print("usage:\n" + "\n".join(__doc__.strip().splitlines()[-2:]), file=sys.stderr)
        return 2
    path = Path(argv[1])
    if argv[0] == "write":
        write(path, sys.stdin.read())
        return 0
    why = problem(path)
    if why:
        print(f"{path} {why}: {REGENERATE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

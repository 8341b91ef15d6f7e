"""The layers of src/preftune, declared once: no import goes up, and there is no import circle.

Every import of every module counts, including imports inside functions. A module may import
from its own layer (without a circle) and from any layer below it. ``losses.py`` and
``logprobs.py`` import torch and nothing of the project.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: Bottom to top. A module belongs to the first entry that is it or a package above it.
LAYERS: list[tuple[str, ...]] = [
    ("preftune.errors", "preftune.stats"),  # the ground floor: errors, and the statistics every layer reports with (no torch)
    ("preftune.losses", "preftune.logprobs"),  # torch only: the math
    ("preftune.system",),  # processes, the processor, progress, hub ids: nothing about preference learning
    ("preftune.config", "preftune.report"),  # the settings; what a run shows (HTML, plots, stats)
    ("preftune.data",),
    ("preftune.models",),
    ("preftune.training",),  # the loop and what it decides and keeps
    ("preftune.eval",),
    ("preftune.stages",),
    ("preftune.demo",),
    ("preftune.cli",),
    ("preftune", "preftune.api", "preftune.docs"),  # the package's __init__, the Python API, the generated parts of docs/
]
TORCH_ONLY = ("preftune.losses", "preftune.logprobs")


def modules(src: Path, package: str = "") -> dict[str, Path]:
    """Dotted name -> file, for every module under ``src`` (packages by their ``__init__``), or under its folder ``package``."""
    found = {}
    for path in sorted((src / package).rglob("*.py")):
        name = ".".join(path.relative_to(src).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports (anywhere in the file), resolved to known modules."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = name.split(".")
            base = parts[: len(parts) - node.level + (1 if is_package else 0)] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            candidates = [f"{module}.{alias.name}" for alias in node.names] + [module]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    # `from preftune.data import x` names the package; its submodule imports are its own edges
    return {t for t in targets if not name.startswith(t + ".")}


def layer_of(name: str, layers: list[tuple[str, ...]]) -> int:
    for index, prefixes in enumerate(layers):
        if any(name == p or name.startswith(p + ".") for p in prefixes if p != "preftune") or name in prefixes:
            return index
    raise AssertionError(f"module {name} is in no declared layer: add it to LAYERS")


def violations(src: Path, layers: list[tuple[str, ...]]) -> list[str]:
    """Every import that goes up a layer, as 'a (layer i) imports b (layer j)'."""
    known = modules(src)
    found = []
    for name, path in known.items():
        for target in sorted(imports(name, path, known)):
            if layer_of(target, layers) > layer_of(name, layers):
                found.append(f"{name} (layer {layer_of(name, layers)}) imports {target} (layer {layer_of(target, layers)})")
    return found


def circles(src: Path, package: str = "") -> list[list[str]]:
    """Import circles among the modules (of ``package``; depth-first search over the import graph)."""
    known = modules(src, package)
    graph = {name: imports(name, path, known) for name, path in known.items()}
    found, seen = [], set()
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                if frozenset(cycle) not in seen:
                    seen.add(frozenset(cycle))
                    found.append(cycle)
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return found


def test_no_import_goes_up_a_layer() -> None:
    assert violations(SRC, LAYERS) == []


def test_no_import_circle() -> None:
    assert circles(SRC) == []


def test_no_import_circle_among_the_benchmarks() -> None:
    """The runners' registry (benchmarks/runners.py) sits above the runners; none imports it back."""
    assert circles(SRC.parent, "benchmarks") == []


def test_losses_and_logprobs_import_torch_and_nothing_of_the_project() -> None:
    known = modules(SRC)
    for name in [m for m in known if any(m == p or m.startswith(p + ".") for p in TORCH_ONLY)]:
        own = name.split(".")[:2]  # a torch-only package's modules may import each other
        foreign = {t for t in imports(name, known[name], known) if t.split(".")[:2] != own}
        assert foreign == set(), f"{name} imports project modules {foreign}"
        tree = ast.parse(known[name].read_text(encoding="utf-8"))
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level
                  and not n.module.startswith(".".join(own) + ".") and n.module != ".".join(own)}
        assert roots <= {"torch", "__future__", "inspect", "math", "collections", "dataclasses", "typing"}, roots


def test_every_module_is_in_a_layer() -> None:
    for name in modules(SRC):
        layer_of(name, LAYERS)


def test_the_layers_are_folders_and_the_root_holds_few_modules() -> None:
    """Each layer above the math is a folder (a package), and at most 10 modules sit directly in src/preftune."""
    package = SRC / "preftune"
    for prefixes in LAYERS[2:-1]:
        for prefix in prefixes:
            assert (package / prefix.removeprefix("preftune.") / "__init__.py").is_file(), f"{prefix} is not a folder"
    root = sorted(path.name for path in package.glob("*.py"))
    assert len(root) <= 10, root


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = tmp_path / "preftune" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return tmp_path


def test_the_checker_catches_an_upward_import_even_inside_a_function(tmp_path: Path) -> None:
    src = _package(tmp_path, {
        "__init__.py": "",
        "losses.py": "import torch\n",
        "training/__init__.py": "",
        "training/loop.py": "from preftune.losses import dpo\n",  # down: fine
        "data/__init__.py": "",
        "data/collate.py": "def f():\n    from preftune.training.loop import fit\n",  # up, hidden in a function
    })
    assert violations(src, LAYERS) == ["preftune.data.collate (layer 4) imports preftune.training.loop (layer 6)"]


def test_the_checker_catches_a_circle(tmp_path: Path) -> None:
    src = _package(tmp_path, {
        "__init__.py": "",
        "eval/__init__.py": "",
        "eval/run.py": "from preftune.eval import judges\n",
        "eval/judges.py": "from . import run\n",  # relative imports count too
    })
    assert circles(src) == [["preftune.eval.judges", "preftune.eval.run", "preftune.eval.judges"]]


def test_the_checker_catches_a_circle_among_the_benchmarks(tmp_path: Path) -> None:
    """The circle benchmarks once had: a runner importing the sweep's registry, the sweep importing the runners."""
    for name, text in {"__init__.py": "", "run_preftune.py": "def run_any():\n    from benchmarks.sweep import RUNNERS\n",
                       "run_trl.py": "from benchmarks.run_preftune import run_any\n", "sweep.py": "from benchmarks import run_trl\n"}.items():
        (tmp_path / "benchmarks").mkdir(exist_ok=True)
        (tmp_path / "benchmarks" / name).write_text(text, encoding="utf-8")
    assert circles(tmp_path, "benchmarks") == [["benchmarks.run_preftune", "benchmarks.sweep", "benchmarks.run_trl", "benchmarks.run_preftune"]]


@pytest.mark.parametrize("relative", ["losses.py", "logprobs.py"])
def test_the_torch_only_rule_is_checked(tmp_path: Path, relative: str) -> None:
    src = _package(tmp_path, {"__init__.py": "", "errors.py": "", relative: "from preftune.errors import X\n"})
    known = modules(src)
    name = "preftune." + relative.removesuffix(".py")
    assert imports(name, known[name], known) == {"preftune.errors"}


def test_no_module_over_400_lines() -> None:
    """A module that grows past 400 lines is split by meaning (DESIGN.md)."""
    long = {name: n for name, path in modules(SRC).items() if (n := len(path.read_text(encoding="utf-8").splitlines())) > 400}
    assert long == {}


BENCHMARKS = SRC.parent / "benchmarks"
MAX_FUNCTION_LINES = 80


def long_functions(roots: list[Path], limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    """'file:function' -> lines, for every function (methods and nested ones included) longer than ``limit``."""
    found = {}
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (lines := node.end_lineno - node.lineno + 1) > limit:
                    found[f"{path.relative_to(root.parent)}:{node.name}"] = lines
    return found


def test_no_function_over_80_lines() -> None:
    """A function that needs a page of body names its steps instead (DESIGN.md: `_fit` reads as its docstring)."""
    assert long_functions([SRC, BENCHMARKS]) == {}


def test_the_size_checker_counts_a_long_function(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("def short():\n    pass\n\n\ndef long():\n" + "    x = 1\n" * 80, encoding="utf-8")
    assert long_functions([tmp_path / "pkg"]) == {"pkg/m.py:long": 81}


#: Module-level containers that may change while the program runs: memos of what a file's bytes hash to, keyed by
#: the file's identity (path, size, mtime, inode), and what this machine can do (inductor probed once per process).
#: They cache facts that hold for every run in the process; they hold no run's state.
MEMOS = {"preftune.system.files._DIGESTS", "preftune.models.compiled._state"}
MUTATORS = {"append", "add", "update", "pop", "popitem", "setdefault", "clear", "remove", "discard", "extend", "insert"}


def run_state_globals(src: Path) -> list[str]:
    """Every module-level dict, list or set that a function of its module changes (a process-wide registry),
    every module-level ``ContextVar`` (state handed between functions out of band), and every ``global``
    statement, as 'module.name'."""
    found = []
    for name, path in modules(src).items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        containers = set()
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) and node.value else []
            value = getattr(node, "value", None)
            called = value.func if isinstance(value, ast.Call) else None
            if (isinstance(called, ast.Name) and called.id == "ContextVar") or (isinstance(called, ast.Attribute) and called.attr == "ContextVar"):
                found += [f"{name}.{t.id}" for t in targets if isinstance(t, ast.Name)]
            mutable = isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)) or (
                isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in {"dict", "list", "set", "defaultdict"})
            containers |= {t.id for t in targets if isinstance(t, ast.Name) and mutable}
        for function in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in ast.walk(function):
                if isinstance(node, ast.Global):
                    found += [f"{name}.{g}" for g in node.names]
                changed = None
                if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
                    for target in (node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]):
                        if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name):
                            changed = target.value.id
                elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS:
                    changed = node.func.value.id if isinstance(node.func.value, ast.Name) else None
                if changed in containers and f"{name}.{changed}" not in MEMOS:
                    found.append(f"{name}.{changed}")
    return sorted(set(found))


def test_no_process_wide_registry_of_run_state() -> None:
    """A decision about a run is made once where it starts and passed down (training/runplan.py), never kept
    in a process-wide table (DESIGN.md): the run folders being set up and the locks held live in the run's own objects."""
    assert run_state_globals(SRC) == []


def test_the_registry_checker_finds_a_registry_and_a_global(tmp_path: Path) -> None:
    src = _package(tmp_path, {"__init__.py": "", "errors.py": "", "stages/__init__.py": "",
                              "stages/lifecycle.py": "_SETUP = {}\nLIMIT = 3\n\ndef start(d):\n    _SETUP[d] = 1\n\n"
                                                  "def stop(d):\n    global LIMIT\n    _SETUP.pop(d)\n",
                              "stages/out_of_band.py": "import contextvars\nfrom contextvars import ContextVar\n"
                                                       "_RUN: ContextVar = ContextVar('run', default=None)\n"
                                                       "_STEP = contextvars.ContextVar('step')\n"})
    assert run_state_globals(src) == ["preftune.stages.lifecycle.LIMIT", "preftune.stages.lifecycle._SETUP",
                                      "preftune.stages.out_of_band._RUN", "preftune.stages.out_of_band._STEP"]

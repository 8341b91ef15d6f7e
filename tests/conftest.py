"""Shared fixtures: a tiny tokenizer and Llama saved to local folders, and learnable data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# The processor's bf16 units, fixed for the whole test run (child processes inherit it): "no", so a
# test's numbers mean the same on every processor. `make test-all` runs the tests marked `fp32_exact`
# (numbers compared at fp32 tolerances) once more with "yes" (PREFTUNE_CPU_BF16_UNITS=1), as on a
# CPU with AMX, where train.bf16 auto must still keep them in fp32. The tests about auto precision
# set it themselves (monkeypatch.setenv); the tests about bf16 set train.bf16=true.
os.environ.setdefault("PREFTUNE_CPU_BF16_UNITS", "0")


# --------------------------------------------------------------------------- the two tiers
# `make test` runs the tests not marked `full`; `make test-all` (CI) runs every test. A test that
# launches a process (a fresh Python interpreter: torch alone takes seconds to import), compiles,
# profiles or runs TRL side by side is marked `full`; the marker is the one place its tier is
# said, and this guard holds it: unmarked, such a test fails at the launch, the compile or the
# profile, naming the marker.
FULL = "full"


def _refuse(what: str, nodeid: str) -> None:
    pytest.fail(f"{nodeid} {what}: mark it @pytest.mark.{FULL} (the full tier, `make test-all`)", pytrace=False)


@pytest.fixture(autouse=True)
def _tier_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN202
    if request.node.get_closest_marker(FULL) is not None:
        yield
        return
    import torch
    import torch.profiler

    node = request.node.nodeid

    launch = subprocess.Popen.__init__

    def popen(self, args, *rest, **kwargs) -> None:  # noqa: ANN001
        program = Path(str(args[0] if isinstance(args, list | tuple) else str(args).split()[0])).name
        if program.startswith("python") or program in ("torchrun", "accelerate", "preftune"):  # a fresh interpreter
            _refuse(f"launches a process ({str(args)[:120]})", node)
        launch(self, args, *rest, **kwargs)  # a tool's probe (uname -p, g++ --version) costs milliseconds

    def compile_(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
        _refuse("compiles (torch.compile)", node)

    def profile(self, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        _refuse("profiles (torch.profiler)", node)

    monkeypatch.setattr(subprocess.Popen, "__init__", popen)
    monkeypatch.setattr(torch, "compile", compile_)
    monkeypatch.setattr(torch.profiler.profile, "__init__", profile)
    yield


# --------------------------------------------------------------------------- a run stopped mid-way
def sigint_at_step(step: int):  # noqa: ANN201
    """An extra loss term (``extra_terms=[...]``) that sends this process a SIGINT during step ``step``
    (one micro-batch a step): the run stops after that step, with a checkpoint, as a Ctrl-C does."""
    import signal

    import torch

    calls = {"n": 0}

    def term(policy: object, reference: object) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGINT)
        return torch.zeros(())

    return term


# --------------------------------------------------------------------------- preftune in a child process (full tier)
CLI = [sys.executable, "-m", "preftune.cli"]


def child_env(**extra: str) -> dict[str, str]:
    """A child process's environment: this one's, with preftune's source and the tests' helpers on the path."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests")]), **extra}


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600, **run: object) -> subprocess.CompletedProcess[str]:
    """``preftune ARGS`` as a user runs it, in a fresh interpreter (a test calling it is marked ``full``)."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=child_env(**(env or {})), **run)


def start_cli(*args: str, env: dict[str, str] | None = None, **popen: object) -> subprocess.Popen[str]:
    """``preftune ARGS`` started in a fresh interpreter, its output piped unless ``stdout=``/``stderr=`` say
    otherwise (a test calling it is marked ``full``)."""
    streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen([*CLI, *args], text=True, env=child_env(**(env or {})), **streams)


def run_python(*args: str, env: dict[str, str] | None = None, timeout: float = 600, **run: object) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` (a module, ``-c CODE``, torchrun) in a fresh interpreter (a test calling it is marked ``full``)."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=child_env(**(env or {})), **run)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (safetensors) and its tokenizer, saved with save_pretrained."""
    from preftune.models.tiny import synthetic_corpus, tiny_llama, train_tokenizer

    folder = tmp_path_factory.mktemp("tiny-model")
    tokenizer = train_tokenizer(synthetic_corpus(), vocab_size=300, out_dir=folder)
    tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4, out_dir=folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201
    """The tiny models' tokenizer (the synthetic corpus, 300 ids), in memory; one per test module, which may change it."""
    from preftune.models.tiny import synthetic_corpus, train_tokenizer

    return train_tokenizer(synthetic_corpus(), vocab_size=300)


@pytest.fixture(scope="session")
def preference_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Train and held-out JSONL files whose preference follows a learnable rule."""
    from preftune.models.tiny import synthetic_preferences

    folder = tmp_path_factory.mktemp("prefs")
    train = write_jsonl(folder / "train.jsonl", synthetic_preferences(64, seed=1))
    held = write_jsonl(folder / "eval.jsonl", synthetic_preferences(32, seed=2))
    return train, held


# --------------------------------------------------------------------------- plain helpers
#: The DPO config the stage and loop tests start from.
DPO_TINY = REPO / "configs" / "dpo-tiny.yaml"


def dpo_config(model_dir: Path, train: Path, held: Path | None, out: Path, *overrides: str):  # noqa: ANN201
    """configs/dpo-tiny.yaml on the tiny model and the given data, quiet, with ``overrides`` on top."""
    from preftune.config.schema import DPOConfig, load_config

    base = [f"--model.path={model_dir}", f"--data.train={train}", f"--train.output_dir={out}", "--train.progress=false",
            "--train.report=false", f"--data.eval={held}" if held else "--data.eval=[]"]
    return load_config(DPOConfig, DPO_TINY, base + list(overrides))


def read_metrics(run: Path) -> list[dict]:
    """A run's metrics.jsonl, one dict a line."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict:
    """Every tensor of a folder's safetensors files, keyed by file name and tensor name."""
    from safetensors.torch import load_file

    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        found.update({f"{path.name}:{k}": v for k, v in load_file(str(path)).items()})
    return found


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    """The same (non-empty) set of tensors, none further apart than ``atol``."""
    assert a.keys() == b.keys() and a
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, f"weights differ by {worst}"


#: Vocabulary and padding id of :func:`tiny_lm`.
TINY_VOCAB = 61
TINY_PAD = 0


def tiny_lm(attn: str = "sdpa", seed: int = 0):  # noqa: ANN201
    """A small random float32 Llama built in memory (no tokenizer), seeded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, pad_token_id=TINY_PAD, tie_word_embeddings=False)
    config._attn_implementation = attn
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()


def random_pairs(n: int, seed: int) -> list:
    """Tokenized pairs of varied prompt and completion lengths, so every batch is padded differently."""
    import random

    from preftune.data.records import TokenizedPair

    rng = random.Random(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return [rng.randrange(1, TINY_VOCAB) for _ in range(rng.randint(lo, hi))]

    return [TokenizedPair(prompt_ids=ids(1, 9), chosen_ids=ids(1, 7), rejected_ids=ids(1, 7), index=i) for i in range(n)]


#: Win-rate judges for the judge and evaluation tests, written as the module ``my_judges``.
JUDGES = '''
def always_policy(prompt, policy, reference):
    return 1

def tie(prompt, policy, reference):
    return 0.5

def longer(prompt, policy, reference):
    return len(policy) > len(reference)

def two(prompt, policy, reference):
    return 2

def boom(prompt, policy, reference):
    raise RuntimeError("judge broke")

def one_arg(prompt):
    return 1

NOT_A_FUNCTION = 3
'''


def write_judges_module(folder: Path) -> Path:
    """``folder/my_judges.py`` holding :data:`JUDGES`; put ``folder`` on sys.path to import it."""
    path = folder / "my_judges.py"
    path.write_text(JUDGES, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def one_thread():  # noqa: ANN201
    """Tiny models run fastest on one thread; two threads on a shared 2-core machine spin and wait."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Every bad input answered: a table of bad command lines, each run through the CLI.

Each case must end with a non-zero exit, no traceback, a message that names the file, record,
field or setting at fault, and nothing half-written: the workspace (data files, a finished run,
the model folder) is byte for byte what it was, and no output file or folder appears. Most run
in-process (``preftune.cli.main.main``), a few as a subprocess (a FIFO must not hang the
process; ``--debug`` anywhere on the line shows the traceback).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import DPO_TINY, run_cli
from preftune.cli.main import main

GOOD = {"prompt": "Say hi.", "chosen": " hi", "rejected": " no"}


@dataclass
class Workspace:
    root: Path
    model: Path  # the tiny model (tokenizer and safetensors)
    data: Path  # a good JSONL file
    done: Path  # a finished run folder, with checkpoints

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / "inputs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        return path

    def lines(self, name: str, *records: object) -> Path:
        return self.file(name, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))

    def dpo(self, *overrides: str, config: Path = DPO_TINY, out: str = "out") -> list[str]:
        """`preftune dpo` on the tiny model and good data, into a new folder (unless overridden)."""
        return ["dpo", str(config), f"--model.path={self.model}", f"--data.train={self.data}", "--data.eval=[]",
                f"--train.output_dir={self.root / out}", "--train.progress=false", "--train.report=false", *overrides]


def _tree(*roots: Path) -> dict[str, str]:
    found = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_symlink() or not path.exists():
                found[str(path)] = "link"
            elif path.is_file():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif path.is_dir():
                found[str(path)] = "dir"
            else:
                found[str(path)] = "special"
    return found


@pytest.fixture(scope="module")
def ws(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    from preftune.models.tiny import synthetic_preferences

    root = tmp_path_factory.mktemp("bad-inputs")
    data = root / "good.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_preferences(16, seed=3)), encoding="utf-8")
    space = Workspace(root, tiny_model_dir, data, root / "done")
    assert main(space.dpo("--train.max_steps=2", "--train.save_every=1", "--train.batch_size=4", out="done")) == 0
    # model folders that are wrong in one way each
    tokenizer_only = root / "tokenizer-only"
    tokenizer_only.mkdir()
    for path in tiny_model_dir.iterdir():
        if not path.name.endswith(".safetensors"):
            shutil.copy(path, tokenizer_only / path.name)
    damaged = root / "damaged-weights"
    shutil.copytree(tiny_model_dir, damaged)
    weights = next(damaged.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "empty-folder").mkdir()
    (root / "a-file").write_text("not a folder")
    return space


@dataclass
class Case:
    argv: Callable[[Workspace], list[str]]
    says: str  # a regex the message must match (it names the file, record, field or setting)


def yaml_config(ws: Workspace, name: str, text: str) -> Path:
    return ws.file(name, text)


def with_key(ws: Workspace, name: str, section: str, line: str) -> Path:
    """dpo-tiny.yaml with one more line in a section."""
    text = DPO_TINY.read_text(encoding="utf-8").replace(f"\n{section}:\n", f"\n{section}:\n  {line}\n", 1)
    return ws.file(name, text)


def data_case(name: str, make: Callable[[Workspace], Path], says: str, *extra: str) -> Case:
    return Case(lambda ws: ws.dpo(f"--data.train={make(ws)}", *extra), says)


def inspect_case(make: Callable[[Workspace], Path], says: str, *extra: str) -> Case:
    return Case(lambda ws: ["data", "inspect", str(make(ws)), *extra], says)


def bad_yaml_run(ws: Workspace) -> Path:
    """A copy of the finished run whose config.yaml is not valid YAML."""
    folder = ws.root / "bad-yaml-run"
    if not folder.exists():
        shutil.copytree(ws.done, folder)
        (folder / "config.yaml").write_text("train: [1, 2\nloss: {\n", encoding="utf-8")
    return folder


def fifo(ws: Workspace) -> Path:
    path = ws.root / "inputs" / "fifo.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        os.mkfifo(path)
    return path


def link_loop(ws: Workspace) -> Path:
    a, b = ws.root / "inputs" / "loop-a.jsonl", ws.root / "inputs" / "loop-b.jsonl"
    a.parent.mkdir(parents=True, exist_ok=True)
    if not a.is_symlink():
        a.symlink_to(b.name)
        b.symlink_to(a.name)
    return a


def broken_link(ws: Workspace) -> Path:
    path = ws.root / "inputs" / "broken.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_symlink():
        path.symlink_to("gone.jsonl")
    return path


def parquet_without_rejected(ws: Workspace) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = ws.root / "inputs" / "no-rejected.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"prompt": ["p", "q"], "chosen": ["a", "b"]}), path)
    return path


CHAT = [{"role": "user", "content": "q"}]
CASES: dict[str, Case] = {
    # ---- the config file
    "config: missing file": Case(lambda ws: ws.dpo(config=ws.root / "nope.yaml"), r"nope\.yaml"),
    "config: a folder": Case(lambda ws: ws.dpo(config=ws.root / "empty-folder"), r"empty-folder"),
    "config: bad YAML": Case(lambda ws: ws.dpo(config=yaml_config(ws, "bad.yaml", "train: [1, 2\nloss: {")), r"bad\.yaml"),
    "config: a list, not a mapping": Case(lambda ws: ws.dpo(config=yaml_config(ws, "list.yaml", "- 1\n- 2\n")), r"list\.yaml"),
    "config: binary bytes": Case(lambda ws: ws.dpo(config=ws.file("bin.yaml", bytes(range(256)))), r"bin\.yaml"),
    "config: unknown section": Case(lambda ws: ws.dpo(config=yaml_config(ws, "sec.yaml", "trian:\n  lr: 1\n")), r"trian.*train"),
    "config: unknown key": Case(lambda ws: ws.dpo(config=with_key(ws, "key.yaml", "train", "lrr: 0.1")), r"lrr.*lr"),
    "config: a text for a number": Case(lambda ws: ws.dpo(config=with_key(ws, "type.yaml", "loss", "label_smoothing: abc")),
                                        r"label_smoothing"),
    "config: a list for a number": Case(lambda ws: ws.dpo("--train.batch_size=[1,2]"), r"batch_size"),
    "config: duplicate YAML key": Case(lambda ws: ws.dpo(config=yaml_config(ws, "dup.yaml", "loss:\n  beta: 0.1\n  beta: 0.2\n")),
                                       r"dup\.yaml.*beta"),
    # ---- overrides and settings
    "override: no value": Case(lambda ws: ws.dpo("--train.lr"), r"train\.lr"),
    "override: unknown key": Case(lambda ws: ws.dpo("--train.learning_rate=1"), r"learning_rate"),
    "override: unknown section": Case(lambda ws: ws.dpo("--foo.bar=1"), r"foo"),
    "setting: lr nan": Case(lambda ws: ws.dpo("--train.lr=nan"), r"lr"),
    "setting: lr inf": Case(lambda ws: ws.dpo("--train.lr=inf"), r"lr"),
    "setting: lr negative": Case(lambda ws: ws.dpo("--train.lr=-1"), r"lr"),
    "setting: adam betas": Case(lambda ws: ws.dpo("--train.adam_betas=[0.9,1.5]"), r"adam_betas"),
    "setting: adam eps": Case(lambda ws: ws.dpo("--train.adam_eps=-1e-8"), r"adam_eps"),
    "setting: weight decay nan": Case(lambda ws: ws.dpo("--train.weight_decay=nan"), r"weight_decay"),
    "setting: logprob chunk size": Case(lambda ws: ws.dpo("--train.logprob_chunk_size=0"), r"logprob_chunk_size"),
    "setting: batch size 0": Case(lambda ws: ws.dpo("--train.batch_size=0"), r"batch_size"),
    "setting: negative warmup": Case(lambda ws: ws.dpo("--train.warmup_steps=-3"), r"warmup_steps"),
    "setting: max_steps -1": Case(lambda ws: ws.dpo("--train.max_steps=-1"), r"max_steps"),
    "setting: beta 0": Case(lambda ws: ws.dpo("--loss.beta=0"), r"beta"),
    "setting: beta nan": Case(lambda ws: ws.dpo("--loss.beta=nan"), r"beta"),
    "setting: unknown loss": Case(lambda ws: ws.dpo("--loss.name=dpoo"), r"dpoo"),
    "setting: max_length 1": Case(lambda ws: ws.dpo("--data.max_length=1"), r"max_length"),
    "setting: on_overflow": Case(lambda ws: ws.dpo("--data.on_overflow=maybe"), r"on_overflow"),
    "setting: eval_fraction 2": Case(lambda ws: ws.dpo("--data.eval_fraction=2"), r"eval_fraction"),
    # ---- run folders
    "run: output_dir is a file": Case(lambda ws: ws.dpo(f"--train.output_dir={ws.root / 'a-file'}"), r"a-file.*is a file"),
    "run: output_dir inside a file": Case(lambda ws: ws.dpo(f"--train.output_dir={ws.root / 'a-file' / 'run'}"),
                                          r"a-file/run': not a directory"),
    "run: a finished run": Case(lambda ws: ws.dpo(f"--train.output_dir={ws.done}"), r"done.*already holds a run"),
    "run: resume from nothing": Case(lambda ws: ws.dpo("--train.resume_from=latest"), r"holds no complete checkpoint"),
    "run: resume from a missing path": Case(lambda ws: ws.dpo(f"--train.output_dir={ws.done}",
                                                               f"--train.resume_from={ws.root / 'no-ckpt'}"), r"no-ckpt"),
    "run: resume under another config": Case(lambda ws: ws.dpo(f"--train.output_dir={ws.done}", "--train.resume_from=latest",
                                                                "--train.batch_size=4", "--train.lr=0.5"),
                                             r"another config.*train\.lr \(0\.001 -> 0\.5\)"),
    "run: resume with another global batch": Case(lambda ws: ws.dpo(f"--train.output_dir={ws.done}", "--train.resume_from=latest",
                                                                    "--train.batch_size=8"), r"global batch of 4.*this run has 8"),
    "run: resume from a folder that is no checkpoint": Case(lambda ws: ws.dpo(f"--train.output_dir={ws.done}",
                                                                             f"--train.resume_from={ws.root / 'empty-folder'}"),
                                                            r"empty-folder.*no manifest\.json"),
    # ---- model folders
    "model: missing folder": Case(lambda ws: ws.dpo(f"--model.path={ws.root / 'no-model'}"), r"model folder \(model\.path\).*no-model"),
    "model: empty folder": Case(lambda ws: ws.dpo(f"--model.path={ws.root / 'empty-folder'}"), r"empty-folder.*it is empty"),
    "model: a file": Case(lambda ws: ws.dpo(f"--model.path={ws.root / 'a-file'}"), r"a-file"),
    "model: no weights": Case(lambda ws: ws.dpo(f"--model.path={ws.root / 'tokenizer-only'}"), r"tokenizer-only.*no \.safetensors"),
    "model: cut weights file": Case(lambda ws: ws.dpo(f"--model.path={ws.root / 'damaged-weights'}"), r"damaged-weights"),
    # ---- data files, through training
    "data: missing file": data_case("x", lambda ws: ws.root / "missing.jsonl", r"missing\.jsonl.*no such file"),
    "data: a folder": data_case("x", lambda ws: ws.root / "empty-folder", r"empty-folder"),
    "data: empty file": data_case("x", lambda ws: ws.file("empty.jsonl", ""), r"empty\.jsonl.*no records"),
    "data: blank lines only": data_case("x", lambda ws: ws.file("blank.jsonl", "\n\n  \n"), r"blank\.jsonl.*no records"),
    "data: binary bytes": data_case("x", lambda ws: ws.file("bin.jsonl", bytes(range(256)) * 4), r"bin\.jsonl.*line 1"),
    "data: UTF-16": data_case("x", lambda ws: ws.file("u16.jsonl", json.dumps(GOOD).encode("utf-16")), r"u16\.jsonl.*line 1"),
    "data: FIFO": data_case("x", fifo, r"fifo\.jsonl.*FIFO"),
    "data: symlink loop": data_case("x", link_loop, r"loop-a\.jsonl.*symbolic link loop"),
    "data: broken symlink": data_case("x", broken_link, r"broken\.jsonl.*broken symbolic link"),
    "data: unsupported type": data_case("x", lambda ws: ws.file("notes.txt", "hello"), r"notes\.txt.*unsupported file type"),
    "data: invalid JSON line": data_case("x", lambda ws: ws.lines("badline.jsonl", GOOD, '{"prompt": '),
                                         r"badline\.jsonl, line 2"),
    "data: duplicate key": data_case("x", lambda ws: ws.lines("dupkey.jsonl", '{"prompt": "a", "prompt": "b", "chosen": "c", '
                                                                          '"rejected": "d"}'), r"dupkey\.jsonl, line 1.*prompt"),
    "data: bad unicode escape": data_case("x", lambda ws: ws.lines("esc.jsonl", '{"prompt": "\\ud800x\\uZZZZ", "chosen": "c", '
                                                                           '"rejected": "r"}'), r"esc\.jsonl, line 1"),
    "data: deep nesting": data_case("x", lambda ws: ws.lines("deep.jsonl", '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"),
                                    r"deep\.jsonl, line 1"),
    "data: a list, not an object": data_case("x", lambda ws: ws.lines("list.jsonl", GOOD, [1, 2]), r"list\.jsonl, line 2"),
    "data: missing field": data_case("x", lambda ws: ws.lines("nofield.jsonl", {"prompt": "p", "chosen": "c"}),
                                     r"nofield\.jsonl, line 1, field 'rejected'", "--data.format=explicit"),
    "data: fields of no known format": data_case("x", lambda ws: ws.lines("noformat.jsonl", {"prompt": "p", "chosen": "c"}),
                                                 r"noformat\.jsonl, line 1: cannot tell the format"),
    "data: number for text": data_case("x", lambda ws: ws.lines("num.jsonl", {**GOOD, "chosen": 5}), r"num\.jsonl, line 1, field 'chosen'"),
    "data: null field": data_case("x", lambda ws: ws.lines("null.jsonl", {**GOOD, "prompt": None}), r"null\.jsonl, line 1, field 'prompt'"),
    "data: invalid UTF-8": data_case("x", lambda ws: ws.file("utf8.jsonl", b'{"prompt": "\xff", "chosen": "c", "rejected": "r"}\n'),
                                     r"utf8\.jsonl, line 1.*UTF-8"),
    "data: chat role": data_case("x", lambda ws: ws.lines("role.jsonl", {"prompt": CHAT, "chosen": [{"role": "robot", "content": "a"}],
                                                                      "rejected": [{"role": "assistant", "content": "b"}]}),
                                 r"role\.jsonl, line 1.*robot"),
    "data: chat message without content": data_case("x", lambda ws: ws.lines("nocontent.jsonl", {
        "prompt": CHAT, "chosen": [{"role": "assistant"}], "rejected": [{"role": "assistant", "content": "b"}]}),
        r"nocontent\.jsonl, line 1.*chosen"),
    "data: CSV without a column": data_case("x", lambda ws: ws.file("cols.csv", "prompt,chosen\np,c\n"), r"cols\.csv.*rejected"),
    "data: Parquet without a column": data_case("x", parquet_without_rejected, r"no-rejected\.parquet.*rejected"),
    "data: cut JSON array": data_case("x", lambda ws: ws.file("cut.json", json.dumps([GOOD, GOOD])[:-20]), r"cut\.json"),
    "data: damaged gzip": data_case("x", lambda ws: ws.file("bad.jsonl.gz", gzip.compress(json.dumps(GOOD).encode())[:-12]),
                                    r"bad\.jsonl\.gz"),
    "data: column map to a missing field": data_case("x", lambda ws: ws.data, r"good\.jsonl, line 1.*'question'",
                                                     "--data.columns={prompt: question}"),
    "data: no training files": Case(lambda ws: ws.dpo("--data.train=[]"), r"data\.train"),
    # ---- data inspect
    "inspect: missing file": inspect_case(lambda ws: ws.root / "missing.jsonl", r"missing\.jsonl.*no such file"),
    "inspect: FIFO": inspect_case(fifo, r"fifo\.jsonl.*FIFO"),
    "inspect: symlink loop": inspect_case(link_loop, r"loop-a\.jsonl.*symbolic link loop"),
    "inspect: max-records -1": inspect_case(lambda ws: ws.data, r"max.records", "--max-records=-1"),
    "inspect: tokenizer missing": inspect_case(lambda ws: ws.data, r"no-tok", "--tokenizer=/nonexistent/no-tok"),
    "inspect: tokenizer empty": inspect_case(lambda ws: ws.data, r"empty-folder.*it is empty", "--tokenizer", "TOKDIR"),
    "inspect: max-length 0": inspect_case(lambda ws: ws.data, r"max_length", "--tokenizer", "MODEL", "--max-length=0"),
    "inspect: bad column map": inspect_case(lambda ws: ws.data, r"columns|prompt", "--columns=prompt"),
    "inspect: a bad record (training would refuse)": inspect_case(lambda ws: ws.lines("one-bad.jsonl", GOOD, {"prompt": "p"}),
                                                                  r"one-bad\.jsonl"),
    # ---- eval, generate, report, score, demo
    "eval: beta 0": Case(lambda ws: ["eval", str(ws.done), "--beta=0"], r"beta"),
    "eval: max-pairs -1": Case(lambda ws: ["eval", str(ws.done), "--max-pairs=-1"], r"max.pairs"),
    "eval: missing policy": Case(lambda ws: ["eval", str(ws.root / "no-run")], r"no-run"),
    "eval: judge file missing": Case(lambda ws: ["eval", str(ws.done), f"--judge={ws.root / 'judge.py'}:f"], r"judge\.py"),
    "eval: out is a file": Case(lambda ws: ["eval", str(ws.done), f"--out={ws.root / 'a-file'}"], r"a-file"),
    "generate: out is a folder": Case(lambda ws: ["generate", str(ws.done), str(ws.data), f"--out={ws.root / 'empty-folder'}"],
                                      r"empty-folder"),
    "generate: missing model": Case(lambda ws: ["generate", str(ws.root / "no-model"), str(ws.data), f"--out={ws.root / 'g.jsonl'}"],
                                    r"no-model"),
    "generate: missing prompts": Case(lambda ws: ["generate", str(ws.done), str(ws.root / "no-prompts.jsonl"),
                                                  f"--out={ws.root / 'g.jsonl'}"], r"no-prompts\.jsonl"),
    "generate: max-new-tokens 0": Case(lambda ws: ["generate", str(ws.done), str(ws.data), f"--out={ws.root / 'g.jsonl'}",
                                                   "--max-new-tokens=0"], r"max.new.tokens"),
    "report: not a run folder": Case(lambda ws: ["report", str(ws.root / "empty-folder")], r"empty-folder"),
    "report: missing folder": Case(lambda ws: ["report", str(ws.root / "no-run")], r"no-run"),
    "score: missing reward model": Case(lambda ws: ["score", str(ws.root / "no-rm"), str(ws.data)], r"no-rm"),
    "demo: beta 0": Case(lambda ws: ["demo", "--beta=0", f"--out={ws.root / 'demo'}"], r"--beta"),
    "demo: out is a file": Case(lambda ws: ["demo", f"--out={ws.root / 'a-file'}"], r"a-file"),
    # ---- issue 25: what a careful user tried
    "data: margin a 400-digit integer": data_case("big-margin", lambda ws: ws.lines("big.jsonl", {**GOOD, "margin": 10**400}),
                                                  r"big\.jsonl, line 1.*margin.*finite number, got int 1000"),
    "data: margin 1e999": data_case("inf-margin", lambda ws: ws.lines("inf.jsonl", GOOD, json.dumps(GOOD)[:-1] + ', "margin": 1e999}'),
                                    r"inf\.jsonl, line 2.*margin.*finite"),
    "setting: seed 10^23": Case(lambda ws: ws.dpo("--train.seed=100000000000000000000000"), r"train\.seed"),
    "data: a plain file named .gz": data_case("fake-gz", lambda ws: ws.lines("plain.jsonl.gz", GOOD), r"plain\.jsonl\.gz.*not gzip"),
    "setting: max_records 0": Case(lambda ws: ws.dpo("--data.max_records=0"), r"data\.max_records"),
    "run: empty output_dir": Case(lambda ws: ws.dpo("--train.output_dir="), r"train\.output_dir is empty"),
    "report: config.yaml not YAML": Case(lambda ws: ["report", str(bad_yaml_run(ws))], r"bad-yaml-run/config\.yaml.*not valid YAML"),
    "eval: config.yaml not YAML": Case(lambda ws: ["eval", str(bad_yaml_run(ws))], r"bad-yaml-run/config\.yaml.*not valid YAML"),
    "generate: config.yaml not YAML": Case(lambda ws: ["generate", str(bad_yaml_run(ws)), str(ws.data), f"--out={ws.root / 'g.jsonl'}"],
                                           r"bad-yaml-run/config\.yaml.*not valid YAML"),
}


def _substitute(argv: list[str], ws: Workspace) -> list[str]:
    return [str(ws.root / "empty-folder") if a == "TOKDIR" else str(ws.model) if a == "MODEL" else a for a in argv]


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_input_is_answered_cleanly(ws: Workspace, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    case = CASES[name]
    argv = _substitute(case.argv(ws), ws)  # builds the case's input files first
    before = _tree(ws.root, ws.model)
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own usage errors
        code = stop.code
    out, err = capsys.readouterr()
    assert code not in (0, None), f"exit status {code}\n{out}\n{err}"
    assert "Traceback" not in out + err
    assert re.search(case.says, out + err, flags=re.S), out + err  # data inspect reports on stdout
    assert _tree(ws.root, ws.model) == before, "the command left something behind or changed a file"


def test_the_suite_holds_at_least_60_cases() -> None:
    assert len(CASES) >= 60


# --------------------------------------------------------------------------- as a user runs it
@pytest.mark.full
def test_a_fifo_is_refused_at_once_not_read_forever(ws: Workspace) -> None:
    result = run_cli("data", "inspect", str(fifo(ws)), timeout=60)
    assert result.returncode == 2 and "FIFO" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("where", ["before the verb", "after the verb", "at the end"])
def test_debug_is_accepted_anywhere_and_shows_the_traceback(ws: Workspace, where: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["data", "inspect", str(ws.root / "missing.jsonl")]
    argv = {"before the verb": ["--debug", *argv], "after the verb": [*argv[:2], "--debug", *argv[2:]],
            "at the end": [*argv, "--debug"]}[where]
    from preftune.errors import DataError

    with pytest.raises(DataError, match="missing.jsonl"):
        main(argv)
    assert main([a for a in argv if a != "--debug"]) == 2  # without it: a message, no traceback
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.full
def test_debug_in_a_subprocess_prints_the_traceback(ws: Workspace) -> None:
    result = run_cli("data", "inspect", str(ws.root / "missing.jsonl"), "--debug", timeout=120)
    assert result.returncode != 0 and "Traceback" in result.stderr and "DataError" in result.stderr

"""Data preparation at scale: ``python -m benchmarks.prep [--sizes 10000,20000,40000,80000,160000] [--smoke]``.

Generates N synthetic HH-shaped pairs (multi-turn ``\\n\\nHuman: ... \\n\\nAssistant:`` prompts,
and chosen/rejected responses) whose shapes are drawn from the real HH-RLHF files in
``../shared/data/hh-rlhf`` (their number of turns and the character lengths of each turn and of
each final response are resampled record by record; the words are the benchmark fixtures'
synthetic language, so no HH text is copied). The file is written once per size, as explicit
``prompt``/``chosen``/``rejected`` records, and then, each in a fresh process (so each peak RSS
is its own):

- ``preftune-cold``: read, validate, tokenize and write the tokenized cache (``data.prepare``
  with an empty ``data.tokenized_cache_dir``): what the first run of a training pays;
- ``preftune-warm``: the same call again, answered by the cache: what a second run pays;

after either, every item is read once (the lengths a stage computes next for length grouping):
``lengths_seconds`` apart from ``seconds``, its memory in the peak RSS;
- ``trl``: TRL 1.16's dataset preparation of the same file: ``datasets.load_dataset("json")``
  then ``DPOTrainer._prepare_dataset`` (prompt extraction check, EOS, tokenization), with an
  empty ``HF_DATASETS_CACHE``, so its Arrow cache is written as preftune's is;
- ``inspect``: ``preftune data inspect FILE --tokenizer DIR --json`` (read, check, tokenize, report).

Tokenizer: the benchmark fixtures' 8192-token BPE, both sides, one thread each
(``TOKENIZERS_PARALLELISM=false``, ``dataset_num_proc`` unset). Prints one JSON line per
measurement, a table, and each kind's seconds per 10k records at every size: linear growth
keeps that number flat.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROCESS_START = time.perf_counter()
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HH = REPO.parent / "shared" / "data" / "hh-rlhf"
KINDS = ("preftune-cold", "preftune-warm", "trl", "inspect")
MARKER_H, MARKER_A = "\n\nHuman:", "\n\nAssistant:"


def hh_shapes(folder: Path = HH) -> list[dict[str, Any]]:
    """Per real record: the character lengths of its turns and of its two final responses."""
    shapes = []
    for path in sorted(folder.glob("*/*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                chosen, rejected = record["chosen"], record["rejected"]
                cut = chosen.rfind(MARKER_A) + len(MARKER_A)
                prompt, rest = chosen[:cut], rejected[rejected.rfind(MARKER_A) + len(MARKER_A):]
                turns = [t for t in prompt.replace(MARKER_A, MARKER_H).split(MARKER_H) if t.strip()]
                shapes.append({"turns": [len(t) for t in turns], "chosen": len(chosen) - cut, "rejected": len(rest)})
    if not shapes:
        raise SystemExit(f"no HH-RLHF files under {folder} (expected */*.jsonl.gz)")
    return shapes


def synthetic_file(path: Path, n: int, shapes: list[dict[str, Any]], seed: int = 0) -> None:
    """``n`` records with the shapes of randomly drawn real ones, words from the fixtures' language."""
    from benchmarks.fixtures import _Language

    rng = random.Random(seed)
    lang = _Language(random.Random(seed + 1))

    def text(chars: int) -> str:
        out, size = [], 0
        while size < max(chars, 1):
            piece = lang.piece(word_only=not out or not out[-1].startswith(" "))
            out.append(piece)
            size += len(piece)
        return "".join(out)

    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            shape = rng.choice(shapes)
            prompt = "".join((MARKER_H if i % 2 == 0 else MARKER_A) + text(chars) for i, chars in enumerate(shape["turns"]))
            if len(shape["turns"]) % 2 == 0:  # ends with an assistant turn: the next one is the human's
                prompt += MARKER_H + text(40)
            f.write(json.dumps({"prompt": prompt + MARKER_A, "chosen": text(shape["chosen"]),
                                "rejected": text(shape["rejected"])}) + "\n")


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child(kind: str, data: Path, tokenizer_dir: Path, work: Path) -> dict[str, Any]:
    """One measurement in this (fresh) process; ``seconds`` starts after the imports (the same few
    seconds for every size), ``process_seconds`` holds them too."""
    import datasets  # noqa: F401 - imported up front by every kind, so the clock starts on equal terms
    import transformers  # noqa: F401

    import preftune.data.prepare  # noqa: F401

    if kind == "trl":
        import trl  # noqa: F401
    started = time.perf_counter()
    extra: dict[str, Any] = {}
    if kind.startswith("preftune"):
        from preftune.config.schema import DataConfig
        from preftune.data.prepare import prepare
        from preftune.models.tokenizer import load_tokenizer

        cfg = DataConfig(train=[str(data)], max_length=1024, max_prompt_length=512, tokenized_cache_dir=str(work / "tokenized"))
        prepared = prepare(cfg, load_tokenizer(str(tokenizer_dir)), records="pairs", seed=0)
        info = prepared.reports["train"]["tokenized_cache"]
        if info["hit"] != (kind == "preftune-warm"):
            raise RuntimeError(f"{kind}: the cache was {'hit' if info['hit'] else 'missed'}")
        kept = len(prepared.train)
        # What every stage does next (length grouping): read each item once. Timed apart; in the peak RSS.
        touched = time.perf_counter()
        extra["item_tokens"] = sum(p.shared_length for p in prepared.train)
        extra["lengths_seconds"] = time.perf_counter() - touched
    elif kind == "trl":
        import types

        from datasets import load_dataset
        from transformers import AutoTokenizer
        from trl import DPOConfig, DPOTrainer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        dataset = load_dataset("json", data_files=str(data), split="train")
        args = DPOConfig(output_dir=str(work / "trl"), max_length=1024, report_to="none", use_cpu=True)
        owner = types.SimpleNamespace(_tokenizer=tokenizer, processing_class=tokenizer, args=args)
        kept = len(DPOTrainer._prepare_dataset(owner, dataset, tokenizer, args, "train"))
    else:
        import contextlib
        import io

        from preftune.cli.main import main as preftune_main

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = preftune_main(["data", "inspect", str(data), "--tokenizer", str(tokenizer_dir), "--max-length", "1024", "--json"])
        if code != 0:
            raise RuntimeError(f"data inspect exited {code}")
        kept = json.loads(out.getvalue())["kept"]
    seconds = time.perf_counter() - started - extra.get("lengths_seconds", 0.0)
    return {"kind": kind, "seconds": seconds, "process_seconds": time.perf_counter() - PROCESS_START,
            "peak_rss_bytes": peak_rss_bytes(), "kept": kept, **extra}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,20000,40000,80000,160000")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--smoke", action="store_true", help="sizes 100,200 (CI)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.data, args.tokenizer, args.workdir)))
        return 0

    from benchmarks.common import machine
    from benchmarks.fixtures import build_fixtures

    here = machine()  # every row carries the processor it ran on
    work = args.workdir or Path(tempfile.mkdtemp(prefix="preftune-prep-"))
    work.mkdir(parents=True, exist_ok=True)
    fixtures, _ = build_fixtures(work / "fixtures", ["7m"])
    sizes = [100, 200] if args.smoke else [int(s) for s in args.sizes.split(",")]
    kinds = [k for k in args.kinds.split(",") if k]
    shapes = hh_shapes()
    records: list[dict[str, Any]] = []
    for n in sizes:
        data = work / f"hh-synthetic-{n}.jsonl"
        if not data.is_file():
            synthetic_file(data, n, shapes)
        size_dir = work / f"run-{n}"
        for kind in kinds:
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_CACHE": str(size_dir / f"hf-{kind}"),
                   "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
            command = [sys.executable, "-m", "benchmarks.prep", "--child", kind, "--data", str(data),
                       "--tokenizer", str(fixtures.root / "tokenizer"), "--workdir", str(size_dir)]
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{kind} at {n} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                return 1
            record = {**json.loads(done.stdout.strip().splitlines()[-1]), "records": n, "file_bytes": data.stat().st_size,
                      "loadavg_end": list(os.getloadavg()), "machine": here}
            print(json.dumps(record), flush=True)
            records.append(record)
    print(f"\n{'kind':<14} {'records':>8} {'seconds':>9} {'s / 10k':>8} {'peak RSS GiB':>12}")
    for r in records:
        print(f"{r['kind']:<14} {r['records']:>8} {r['seconds']:>9.2f} {1e4 * r['seconds'] / r['records']:>8.2f} "
              f"{r['peak_rss_bytes'] / 2**30:>12.2f}")
    for kind in kinds:
        rows = [r for r in records if r["kind"] == kind]
        per = [r["seconds"] / r["records"] for r in rows]
        if len(rows) > 1:
            print(f"{kind}: seconds per record at the largest size / at the smallest = {per[-1] / per[0]:.2f} "
                  f"(1.00 = linear); peak RSS {rows[0]['peak_rss_bytes'] / 2**30:.2f} -> {rows[-1]['peak_rss_bytes'] / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `generate`, `eval` and `report` verbs: arguments in, library calls out.

The settings' defaults live in their dataclasses (:class:`~preftune.generate.GenerationSettings`,
:class:`~preftune.eval_run.EvalSettings`); argparse defaults are None, and only flags given on
the command line are passed on.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_generate(parser: argparse.ArgumentParser) -> None:
    """`preftune generate MODEL PROMPTS... --out FILE`."""
    parser.add_argument("model", help="a model folder, a run folder (its final/), a LoRA adapter or a checkpoint")
    parser.add_argument("prompts", nargs="+", help="prompt files (JSONL/JSON/CSV/Parquet with `prompt`, or preference data)")
    parser.add_argument("--out", required=True, help="JSONL file to write")
    parser.add_argument("--system", help="system prompt for prompts that bring none")
    parser.add_argument("--max-records", type=int, help="read at most this many records per file")
    for flag, kind in (("--max-new-tokens", int), ("--temperature", float), ("--top-k", int), ("--top-p", float),
                       ("--min-p", float), ("--num-beams", int), ("--repetition-penalty", float),
                       ("--num-samples", int), ("--seed", int), ("--batch-size", int)):
        parser.add_argument(flag, type=kind, default=None)
    parser.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None,
                        help="sample (default: when temperature > 0 and num_beams == 1)")


def run_generate(args: argparse.Namespace) -> int:
    from preftune.generate import GenerationSettings, run_generate as generate_files

    fields = [f.name for f in __import__("dataclasses").fields(GenerationSettings)]
    settings = GenerationSettings(**{name: getattr(args, name) for name in fields if getattr(args, name, None) is not None})
    path = generate_files(args.model, args.prompts, args.out, settings, system=args.system, max_records=args.max_records)
    print(f"wrote {path}")
    return 0


def add_eval(parser: argparse.ArgumentParser) -> None:
    """`preftune eval POLICY [...]`."""
    parser.add_argument("policy", help="a run folder, model folder or checkpoint (RUN/checkpoints/step-N)")
    parser.add_argument("--reference", help="the reference model (default: the run's)")
    parser.add_argument("--pairs", nargs="+", help="held-out preference data (default: the run's eval data)")
    parser.add_argument("--prompts", nargs="+", help="prompts to sample from (default: the pairs' prompts)")
    parser.add_argument("--texts", nargs="+", help="held-out text for perplexity (.txt, or records with `text`)")
    parser.add_argument("--judge", help="a win-rate judge: module:function or file.py:function")
    parser.add_argument("--reward-model", help="a reward model folder (`preftune rm`) as a judge")
    parser.add_argument("--out", help="folder for eval.json (default: the run folder)")
    parser.add_argument("--label", help="name of this evaluation (eval-LABEL.json)")
    parser.add_argument("--format", help="format of --pairs (default: detected)")
    parser.add_argument("--system", help="system prompt for records that bring none")
    for flag, kind in (("--beta", float), ("--max-length", int), ("--max-prompt-length", int), ("--max-pairs", int),
                       ("--max-prompts", int), ("--num-samples", int), ("--max-new-tokens", int), ("--seed", int),
                       ("--batch-size", int)):
        parser.add_argument(flag, type=kind, default=None)
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")


def run_eval(args: argparse.Namespace) -> int:
    import dataclasses

    from preftune.eval_run import EvalSettings, run_eval as evaluate
    from preftune.report import format_table, write_report

    fields = [f.name for f in dataclasses.fields(EvalSettings)]
    given: dict[str, Any] = {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}
    results = evaluate(EvalSettings(**given))
    if results.get("run_dir"):
        results["report"] = str(write_report(results["run_dir"]))
    if args.json:
        print(json.dumps(_without_lists(results)))
    else:
        print(format_table(results))
        if results.get("report"):
            print(f"report: {results['report']}")
    return 0


def _without_lists(results: dict[str, Any]) -> dict[str, Any]:
    """The JSON summary without the long per-sample lists (they are in eval.json)."""
    out: dict[str, Any] = {}
    for key, value in results.items():
        if isinstance(value, dict):
            out[key] = _without_lists(value)
        elif not (isinstance(value, list) and len(value) > 20):
            out[key] = value
    return out


def add_report(parser: argparse.ArgumentParser) -> None:
    """`preftune report RUN_DIR`."""
    parser.add_argument("run_dir", help="a run folder written by preftune")


def run_report(args: argparse.Namespace) -> int:
    from preftune.report import write_report

    print(write_report(args.run_dir))
    return 0

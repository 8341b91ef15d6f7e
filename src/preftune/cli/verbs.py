"""Every verb of the command line, declared once: its arguments and what it calls.

:data:`VERBS` is the table :mod:`preftune.cli.main` builds the parser from. Settings' defaults
live in their dataclasses (the stage configs, :class:`~preftune.eval.generate.GenerationSettings`,
:class:`~preftune.eval.run.EvalSettings`): argparse defaults are None where a dataclass has the
default, and only flags given on the command line are passed on. Each ``_verb`` function takes
the parsed arguments and the dotted overrides, and returns the exit status.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Verb:
    """One command: ``preftune [GROUP] NAME ...``."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, list[str]], int]
    takes_overrides: bool = False  # dotted --section.key=value overrides (the training verbs)
    description: str = ""
    group: str = ""  # a parent command (`data`)
    group_help: str = ""


def _numbers(parser: argparse.ArgumentParser, flags: tuple[tuple[str, type], ...]) -> None:
    for flag, kind in flags:
        parser.add_argument(flag, type=kind, default=None)


def _given(settings_cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The dataclass fields the command line set (the rest keep the dataclass defaults)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(settings_cls) if getattr(args, f.name, None) is not None}


# --------------------------------------------------------------------------- training stages
def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a YAML config file (see configs/)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _stage(name: str) -> Callable[[argparse.Namespace, list[str]], int]:
    def run(args: argparse.Namespace, overrides: list[str]) -> int:
        import importlib

        from preftune.config.schema import STAGES, load_config, to_yaml

        cfg = load_config(STAGES[name], args.config, overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        if name == "dpo" and not getattr(args, "sweep", None) and (cfg.sweep.judge or cfg.sweep.reward_model):
            from preftune.errors import ConfigError

            raise ConfigError("sweep.judge and sweep.reward_model are read by --sweep only; to judge one run, use `preftune eval --judge`")
        if getattr(args, "sweep", None):
            from preftune.stages.sweep import run_sweep

            run_sweep(cfg, args.sweep)
            return 0
        importlib.import_module(f"preftune.stages.{name}").run(cfg)
        return 0

    return run


def _sweep_arguments(parser: argparse.ArgumentParser) -> None:
    _config_arguments(parser)
    parser.add_argument("--sweep", action="append", metavar="KEY=V1,V2,...",
                        help="train one policy per value (e.g. loss.beta=0.05,0.1,0.2 or loss.name=dpo,ipo), each in "
                        "OUTPUT_DIR/KEY-VALUE, against one cached reference pass; repeat to sweep a grid. With held-out data each is "
                        "evaluated; --sweep.judge=module:function or --sweep.reward_model=FOLDER judges its samples against the "
                        "reference's, and the report plots that score against KL")


def _stage_verb(name: str, help_text: str) -> Verb:
    arguments = _sweep_arguments if name == "dpo" else _config_arguments
    return Verb(name, help_text, arguments, _stage(name), takes_overrides=True,
                description=f"{help_text}. Settings come from CONFIG (YAML) and dotted overrides "
                "such as --train.lr=1e-6 or --data.max_length=512.")


def _iterate(args: argparse.Namespace, overrides: list[str]) -> int:
    from preftune.config.schema import to_yaml
    from preftune.report.series import format_iteration
    from preftune.stages import iterate
    from preftune.stages.iterate_config import load_iterate_config

    cfg = load_iterate_config(args.config, overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    out = iterate.run(cfg)
    print(format_iteration(json.loads((out / "iterate.json").read_text(encoding="utf-8"))))
    return 0


# --------------------------------------------------------------------------- data inspect
def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    from preftune.config.schema import DataConfig
    from preftune.data.formats import FORMATS

    defaults = DataConfig()
    parser.add_argument("path", nargs="+", help="data files (.jsonl, .json, .csv, .tsv, each also .gz; .parquet) or `datasets` folders")
    parser.add_argument("--format", default="auto", choices=("auto",) + FORMATS, help="input format (default: detected)")
    parser.add_argument("--columns", default="", metavar="OURS=THEIRS,...", help="rename fields, e.g. prompt=question,chosen=better")
    parser.add_argument("--on-error", default=None, choices=("error", "skip"),
                        help="by default every record is checked and the malformed ones are counted by reason, and the exit "
                        "status is 1 when training (data.on_error: error) would refuse the file; error: stop at the first, "
                        "as training does; skip: count them and exit 0, as training with data.on_error: skip would")
    parser.add_argument("--max-records", type=int, default=None, metavar="N", help="read at most N records per file")
    parser.add_argument("--tokenizer", default=None, metavar="DIR", help="a tokenizer folder: also report token lengths and truncation")
    parser.add_argument("--max-length", type=int, default=defaults.max_length, metavar="N",
                        help=f"prompt + completion tokens (default {defaults.max_length})")
    parser.add_argument("--max-prompt-length", type=int, default=defaults.max_prompt_length, metavar="N",
                        help=f"prompt tokens; a longer prompt keeps its end (default {defaults.max_prompt_length})")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


def _inspect(args: argparse.Namespace, overrides: list[str]) -> int:
    """Load (and optionally tokenize) the data, print the report."""
    from preftune.data.inspect import (
        format_report,
        inspect_files,
        malformed_count,
        parse_columns,
        report_dict,
    )

    tokenizer = None
    if args.tokenizer:
        from preftune.models.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    report = inspect_files(args.path, format=args.format, columns=parse_columns(args.columns), on_error=args.on_error or "skip",
                           max_records=args.max_records, tokenizer=tokenizer, max_length=args.max_length,
                           max_prompt_length=args.max_prompt_length)
    summary = report_dict(report, with_tokens=bool(args.tokenizer))
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        print(format_report(summary), end="")
    malformed = malformed_count(report)
    if malformed and args.on_error is None:
        print(f"preftune: {malformed} malformed record(s): training (data.on_error: error) would stop at the first; "
              "with data.on_error: skip it trains on the rest", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- score
def _score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a reward model folder written by `preftune rm` (its final/)")
    parser.add_argument("data", nargs="+", help="JSONL/JSON/CSV/Parquet files or a datasets folder")
    parser.add_argument("--out", help="write the scored records here (JSONL); default: standard output")
    parser.add_argument("--format", default="auto", help="the data format (default: detected)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--on-error", choices=("error", "skip"), default="error")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def _score(args: argparse.Namespace, overrides: list[str]) -> int:
    from preftune.stages.score import score_file, summary_line

    records, summary = score_file(args.model, args.data, fmt=args.format, batch_size=args.batch_size, on_error=args.on_error,
                                  progress=True)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if args.out:
        Path(args.out).write_text(lines, encoding="utf-8")
        summary["out"] = args.out
    else:
        sys.stdout.write(lines)
    report = sys.stdout if args.out else sys.stderr
    print(json.dumps(summary) if args.json else summary_line(summary), file=report)
    return 0


# --------------------------------------------------------------------------- generate, eval, report
def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a model folder, a run folder (its final/), a LoRA adapter or a checkpoint")
    parser.add_argument("prompts", nargs="+", help="prompt files (JSONL/JSON/CSV/Parquet with `prompt`, or preference data)")
    parser.add_argument("--out", required=True, help="JSONL file to write")
    parser.add_argument("--system", help="system prompt for prompts that bring none")
    parser.add_argument("--max-records", type=int, help="read at most this many records per file")
    _numbers(parser, (("--max-new-tokens", int), ("--temperature", float), ("--top-k", int), ("--top-p", float),
                      ("--min-p", float), ("--num-beams", int), ("--repetition-penalty", float),
                      ("--num-samples", int), ("--seed", int), ("--batch-size", int)))
    parser.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None,
                        help="sample (default: when temperature > 0 and num_beams == 1)")
    _trust_flag(parser)


def _generate(args: argparse.Namespace, overrides: list[str]) -> int:
    from preftune.eval.generate import GenerationSettings, run_generate

    settings = GenerationSettings(**_given(GenerationSettings, args))
    path = run_generate(args.model, args.prompts, args.out, settings, system=args.system, max_records=args.max_records,
                        trust_remote_code=bool(args.trust_remote_code))
    print(f"wrote {path}")
    return 0


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("policy", help="a run folder, model folder or checkpoint (RUN/checkpoints/step-N)")
    parser.add_argument("--reference", help="the reference model (default: the run's)")
    parser.add_argument("--pairs", nargs="+", help="held-out preference data (default: the run's eval data)")
    parser.add_argument("--prompts", nargs="+", help="prompts to sample from (default: the pairs' prompts)")
    parser.add_argument("--texts", nargs="+", help="held-out text for perplexity (.txt, or records with `text`)")
    parser.add_argument("--judge", help="a win-rate judge: module:function or file.py:function (imported and run: "
                        "only name code you trust)")
    parser.add_argument("--reward-model", help="a reward model folder (`preftune rm`) as a judge")
    parser.add_argument("--out", help="folder for eval.json (default: the run folder)")
    parser.add_argument("--label", help="name of this evaluation (eval-LABEL.json)")
    parser.add_argument("--format", help="format of --pairs (default: detected)")
    parser.add_argument("--system", help="system prompt for records that bring none")
    _numbers(parser, (("--beta", float), ("--max-length", int), ("--max-prompt-length", int), ("--max-pairs", int),
                      ("--max-prompts", int), ("--num-samples", int), ("--max-new-tokens", int), ("--seed", int),
                      ("--batch-size", int)))
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    _trust_flag(parser)


def _trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-remote-code", action="store_true", default=None,
                        help="run the Python files of the model folder (transformers' trust_remote_code); never taken "
                        "from a run folder's own config.yaml")


def _eval(args: argparse.Namespace, overrides: list[str]) -> int:
    from preftune.eval.run import EvalSettings, run_eval
    from preftune.report.html import format_table, write_report

    results = run_eval(EvalSettings(**_given(EvalSettings, args)))
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


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder written by preftune")


def _report(args: argparse.Namespace, overrides: list[str]) -> int:
    from preftune.report.series import write_any

    print(write_any(args.run_dir))
    return 0


# --------------------------------------------------------------------------- plan
def _plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a training config (YAML); its model.path is read for config.json only, no weights")
    parser.add_argument("--stage", default="dpo", choices=("dpo", "sft", "rm"), help="the stage the config is for (default dpo)")
    parser.add_argument("--devices", type=int, default=1, help="devices (GPUs) for DDP and FSDP/ZeRO-3 (default 1)")
    parser.add_argument("--device-memory", default="80GiB", help="memory of one device, e.g. 80GiB, 24GB (default 80GiB)")
    parser.add_argument("--prompt-tokens", type=int, help="prompt tokens per row (default data.max_prompt_length)")
    parser.add_argument("--completion-tokens", type=int, help="completion tokens (default data.max_length - prompt)")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")


def _plan(args: argparse.Namespace, overrides: list[str]) -> int:
    from preftune.config.schema import STAGES, load_config
    from preftune.errors import PreftuneError
    from preftune.system.distributed import world
    from preftune.training.memory import base_setup, format_plan, load_shape, parse_bytes, plan

    if world()[1] > 1:
        raise PreftuneError(f"`preftune plan` runs in one process; it was launched in {world()[1]}. Run it alone, with --devices N.")
    if args.devices < 1:
        raise PreftuneError(f"--devices must be at least 1, got {args.devices}")
    cfg = load_config(STAGES[args.stage], args.config, overrides)
    shape = load_shape(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    base = base_setup(cfg, args.stage, prompt_tokens=args.prompt_tokens, completion_tokens=args.completion_tokens,
                      params=shape.params())
    result = plan(shape, base, args.devices, parse_bytes(args.device_memory))
    print(json.dumps(result, indent=1) if args.json else format_plan(result), end="\n" if args.json else "")
    return 0


# --------------------------------------------------------------------------- demo
def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="the run folder (default: runs/demo)")
    parser.add_argument("--beta", type=float, action="append",
                        help="DPO beta; give several (--beta 0.05 --beta 0.1 --beta 0.5) to sweep and plot reward against KL")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a reduced demo (smaller corpus, fewer steps): what CI runs")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of iterative DPO (2: a second round sampled from the "
                        "first round's policy; the table and report show the rounds side by side)")


def _demo(args: argparse.Namespace, overrides: list[str]) -> int:
    """Run the demo, print the closing table, write summary.json and report.html."""
    from transformers.utils import logging as hf_logging

    from preftune.demo.evaluation import closing_table
    from preftune.demo.pipeline import DemoSettings, main_pipeline

    hf_logging.disable_progress_bar()  # the demo's own lines say what is happening
    betas = tuple(args.beta) if args.beta else DemoSettings.betas
    if args.rounds < 1 or (args.rounds > 1 and len(betas) > 1):
        from preftune.errors import ConfigError

        raise ConfigError("--rounds must be at least 1, and takes one --beta (the rounds are compared with each other).")
    settings = (DemoSettings.quick(args.out, betas=betas, seed=args.seed, rounds=args.rounds) if args.quick
                else DemoSettings(out=args.out, betas=betas, seed=args.seed, rounds=args.rounds))
    summary = main_pipeline(settings)
    print()
    print(closing_table(summary))
    print(f"\ndemo wall time: {summary['wall_time_s']:.0f} s; results in {Path(args.out) / 'summary.json'}"
          + (f", report in {summary['report']}" if summary.get("report") else ""))
    return 0


# --------------------------------------------------------------------------- tiny
def _tiny_arguments(parser: argparse.ArgumentParser) -> None:
    from preftune.models.tiny import TINY_DATA, TINY_MODEL

    parser.add_argument("--model-dir", default=TINY_MODEL, help=f"where the model goes (default: {TINY_MODEL})")
    parser.add_argument("--data-dir", default=TINY_DATA, help=f"where the data goes (default: {TINY_DATA})")


def _tiny(args: argparse.Namespace, overrides: list[str]) -> int:
    """Write the tiny model and data; one line says what and where, and what to run next."""
    from transformers.utils import logging as hf_logging

    from preftune.models.tiny import write_tiny_setup

    hf_logging.disable_progress_bar()
    written = write_tiny_setup(args.model_dir, args.data_dir)
    print(f"preftune: tiny model in {written[0]}, tiny data in {written[1].parent} ({', '.join(p.name for p in written[1:])}); "
          "next: preftune dpo configs/dpo-tiny.yaml (or sft, rm, kto, iterate with their *-tiny.yaml)")
    return 0


#: The command line, in the order ``preftune --help`` lists it.
VERBS: tuple[Verb, ...] = (
    Verb("inspect", "read a dataset, check every record, and report what it holds", _inspect_arguments, _inspect,
         group="data", group_help="inspect and validate a preference dataset"),
    _stage_verb("dpo", "train a policy with DPO or another preference loss"),
    _stage_verb("sft", "supervised fine-tuning on completions (prompt tokens masked)"),
    _stage_verb("rm", "train a reward model (Bradley-Terry on preference pairs)"),
    _stage_verb("kto", "train a policy with KTO on unpaired (desirable / undesirable) records"),
    Verb("iterate", "iterative DPO: sample from the policy, score with a judge, pair, train; round after round",
         _config_arguments, _iterate, takes_overrides=True,
         description="Rounds of on-policy DPO (round N in OUTPUT_DIR/round-N). Settings come from CONFIG (YAML) and "
         "dotted overrides such as --iterate.rounds=3 or --generate.num_samples=8; continue a stopped iteration with "
         "--train.resume_from=latest."),
    Verb("score", "score prompt/response records or preference pairs with a reward model", _score_arguments, _score),
    Verb("generate", "sample completions for prompts (transformers generation)", _generate_arguments, _generate),
    Verb("eval", "evaluate a policy against its reference: rewards, KL, perplexity, win rate", _eval_arguments, _eval),
    Verb("report", "write RUN_DIR/report.html (plots embedded) and RUN_DIR/plots/*.png", _report_arguments, _report),
    Verb("plan", "estimate per-device memory of a training step for each strategy (from config.json alone)", _plan_arguments,
         _plan, takes_overrides=True),
    Verb("tiny", "write the tiny model and data that configs/*-tiny.yaml use (seconds, seeded: the same files every time)",
         _tiny_arguments, _tiny),
    Verb("demo", "the whole pipeline (SFT, reward model, DPO, evaluation) on an embedded task, in minutes on a CPU",
         _demo_arguments, _demo),
)

"""`preftune VERB ...`: parse the command line, build the config, call the stage.

Every user-fixable problem arrives here as a :class:`~preftune.errors.PreftuneError`; it is
printed as one short paragraph and the exit status is 2. ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys

from preftune.errors import PreftuneError


def _add_config_verb(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(
        name,
        help=help_text,
        description=f"{help_text}. Settings come from CONFIG (YAML) and dotted overrides "
        "such as --train.lr=1e-6 or --data.max_length=512.",
    )
    parser.add_argument("config", help="a YAML config file (see configs/)")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preftune",
        description="Align causal language models with human preferences (DPO and its family).",
    )
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    data = sub.add_parser("data", help="inspect and validate a preference dataset")
    data_sub = data.add_subparsers(dest="data_verb", metavar="ACTION")
    data_sub.required = True
    inspect_parser = data_sub.add_parser(
        "inspect", help="read a dataset, check every record, and report what it holds"
    )
    from preftune.data import inspect as data_inspect

    data_inspect.add_arguments(inspect_parser)

    _add_config_verb(sub, "dpo", "train a policy with DPO or another preference loss")
    _add_config_verb(sub, "sft", "supervised fine-tuning on completions (prompt tokens masked)")
    _add_config_verb(sub, "rm", "train a reward model (Bradley-Terry on preference pairs)")
    score_parser = sub.add_parser("score", help="score prompt/response records or preference pairs with a reward model")
    from preftune import score

    score.add_arguments(score_parser)
    from preftune import commands

    commands.add_generate(sub.add_parser("generate", help="sample completions for prompts (transformers generation)"))
    commands.add_eval(sub.add_parser("eval", help="evaluate a policy against its reference: rewards, KL, perplexity, win rate"))
    commands.add_report(sub.add_parser("report", help="write RUN_DIR/report.html (plots embedded) and RUN_DIR/plots/*.png"))
    demo_parser = sub.add_parser("demo", help="the whole pipeline (SFT, reward model, DPO, evaluation) on an embedded task, in minutes on a CPU")
    from preftune import demo

    demo.add_arguments(demo_parser)
    return parser


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.verb == "data":
        if overrides:
            raise PreftuneError(f"unrecognised arguments: {' '.join(overrides)}")
        from preftune.data import inspect as data_inspect

        return data_inspect.run(args)
    if args.verb in ("generate", "eval", "report"):
        if overrides:
            raise PreftuneError(f"unrecognised arguments: {' '.join(overrides)}")
        from preftune import commands

        return {"generate": commands.run_generate, "eval": commands.run_eval, "report": commands.run_report}[args.verb](args)
    if args.verb == "demo":
        if overrides:
            raise PreftuneError(f"unrecognised arguments: {' '.join(overrides)}")
        from preftune import demo

        return demo.run(args)
    if args.verb == "score":
        if overrides:
            raise PreftuneError(f"unrecognised arguments: {' '.join(overrides)}")
        from preftune import score

        return score.run(args)

    from preftune.config import STAGES, load_config, to_yaml

    cfg = load_config(STAGES[args.verb], args.config, overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    if args.verb == "dpo":
        from preftune.dpo import run_dpo

        run_dpo(cfg)
        return 0
    if args.verb == "sft":
        from preftune.sft import run_sft

        run_sft(cfg)
        return 0
    if args.verb == "rm":
        from preftune.rm import run_rm

        run_rm(cfg)
        return 0
    raise AssertionError(f"unhandled verb {args.verb}")  # pragma: no cover


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    try:
        return _run(args, overrides)
    except PreftuneError as err:
        if args.debug:
            raise
        print(f"preftune: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("preftune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

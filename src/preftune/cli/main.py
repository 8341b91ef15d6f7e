"""`preftune VERB ...`: parse the command line from the verb table, call the verb.

Every user-fixable problem arrives here as a :class:`~preftune.errors.PreftuneError`; it is
printed as one short paragraph and the exit status is 2. ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys

from preftune.cli.verbs import VERBS, Verb
from preftune.distributed import world
from preftune.errors import PreftuneError


def build_parser() -> argparse.ArgumentParser:
    """One sub-command per :data:`~preftune.cli.verbs.VERBS` entry (``data inspect`` nests)."""
    parser = argparse.ArgumentParser(
        prog="preftune",
        description="Align causal language models with human preferences (DPO and its family).",
    )
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    groups: dict[str, argparse._SubParsersAction] = {}
    for verb in VERBS:
        where = sub
        if verb.group:
            if verb.group not in groups:
                group = sub.add_parser(verb.group, help=verb.group_help)
                groups[verb.group] = group.add_subparsers(dest=f"{verb.group}_verb", metavar="ACTION")
                groups[verb.group].required = True
            where = groups[verb.group]
        verb_parser = where.add_parser(verb.name, help=verb.help, description=verb.description or None)
        verb.add_arguments(verb_parser)
        verb_parser.set_defaults(verb_entry=verb)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    verb: Verb = args.verb_entry
    try:
        if overrides and not verb.takes_overrides:
            raise PreftuneError(f"unrecognised arguments: {' '.join(overrides)}")
        processes = world()[1]
        if processes > 1 and not verb.takes_overrides:  # the training verbs are the ones that run data-parallel
            raise PreftuneError(f"`preftune {verb.name}` runs in one process; it was launched in {processes}. "
                                "Only dpo, sft and rm train across processes.")
        return verb.run(args, overrides)
    except PreftuneError as err:
        if args.debug:
            raise
        print(f"preftune: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("preftune: interrupted", file=sys.stderr)
        return 130

"""`preftune VERB ...`: parse the command line from the verb table, call the verb.

Every user-fixable problem arrives here as a :class:`~preftune.errors.PreftuneError` (or an
``OSError`` about a path the user named); it is printed as one short paragraph and the exit
status is 2. ``--debug``, anywhere on the command line, shows the traceback instead. SIGINT and
SIGTERM end the command with one line naming the signal and the shell's status (130, 143); during
training the loop first finishes its step and writes a checkpoint (:mod:`preftune.training.interrupts`).
Launched in several processes, a PreftuneError is printed once: by the first process (rank 0),
since every process reads the same config and data and agrees on each stop; another process
prints its own only when the launch is still running a moment later (:func:`_linger`), so an
error of that process alone is never hidden.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from preftune.cli.verbs import VERBS, Verb
from preftune.errors import PreftuneError
from preftune.system import distributed
from preftune.system.distributed import world
from preftune.system.progress import quiet_transformers_bars
from preftune.training.interrupts import Interrupted


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


class Terminated(BaseException):
    """SIGTERM outside a training loop (which handles it itself: :mod:`preftune.training.interrupts`)."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # --debug is a switch of the whole command line: accepted before or after the verb
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end]
    argv = [a for a in argv[:end] if a != "--debug"] + argv[end:]
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    args.debug = debug
    verb: Verb = args.verb_entry
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return _run(verb, args, overrides)
    finally:
        distributed.abandon()  # a no-op after leave(): a failed command leaves the group to the interpreter's exit
        if main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(verb: Verb, args: argparse.Namespace, overrides: list[str]) -> int:
    try:
        if overrides and not verb.takes_overrides:
            raise PreftuneError(f"unrecognised arguments: {' '.join(overrides)}")
        processes = world()[1]
        if processes > 1 and not verb.takes_overrides:  # the training verbs are the ones that run data-parallel
            raise PreftuneError(f"`preftune {verb.name}` runs in one process; it was launched in {processes}. "
                                "Only the training verbs (dpo, kto, sft, rm) train across processes.")
        with quiet_transformers_bars():  # preftune's own lines and bars say what is happening
            code = verb.run(args, overrides)
        distributed.leave()
        return code
    except PreftuneError as err:
        if args.debug:
            raise
        rank = world()[0]
        if rank > 0 and isinstance(err, Interrupted):  # every process agreed on the stop: the first one says it
            return err.exit_code
        if rank > 0:  # once per launch (module docstring)
            _linger()
        print(f"preftune: {'' if isinstance(err, Interrupted) else 'error: '}{err}" + (f" (process {rank})" if rank else ""),
              file=sys.stderr)
        return err.exit_code
    except OSError as err:  # a file the user named that cannot be read or written
        if args.debug:
            raise
        print(f"preftune: error: {os_error(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # a second signal during training (StoppedAtOnce) says which it was
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"preftune: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    except Terminated:
        print("preftune: terminated (SIGTERM)", file=sys.stderr)
        return 143


#: How long another process waits, after its error, for the first one to end the launch
LINGER_SECONDS = 3.0


def _linger() -> None:
    """A process other than the first waits, after an error, for the launcher to stop it: the
    first process meets the same error, prints it and exits, and torchrun then ends the others
    (it checks every 0.1 s) with a SIGTERM that now ends this one silently. Still running after
    that, the error was this process's alone, and it is printed."""
    import time

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(LINGER_SECONDS)


def os_error(err: OSError) -> str:
    """An OS error as one line that names the file: ``'x.jsonl': permission denied``."""
    what = (err.strerror or str(err)).rstrip(".")
    what = what[:1].lower() + what[1:]
    names = " -> ".join(f"'{name}'" for name in (err.filename, err.filename2) if name is not None)
    return f"{names}: {what}" if names else what

"""`preftune VERB ...`: the command line (verbs declared in one table in :mod:`preftune.cli.verbs`)."""

from preftune.cli.main import main

__all__ = ["main"]

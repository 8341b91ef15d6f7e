"""`preftune demo`: the whole pipeline on an embedded task, on a CPU in minutes (see pipeline.py).

The verb's arguments live in :mod:`preftune.cli.verbs`.
"""

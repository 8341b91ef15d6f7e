"""`preftune demo`: the whole pipeline on an embedded task, on a CPU in minutes (see pipeline.py)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `demo` verb's arguments."""
    parser.add_argument("--out", default="runs/demo", help="the run folder (default: runs/demo)")
    parser.add_argument("--beta", type=float, action="append",
                        help="DPO beta; give several (--beta 0.05 --beta 0.1 --beta 0.5) to sweep and plot reward against KL")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a reduced demo (smaller corpus, fewer steps): what CI runs")


def run(args: argparse.Namespace) -> int:
    """Run the demo, print the closing table, write summary.json and report.html."""
    from pathlib import Path

    from preftune.demo.evaluation import closing_table
    from preftune.demo.pipeline import DemoSettings, main_pipeline

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the demo's own lines say what is happening
    betas = tuple(args.beta) if args.beta else DemoSettings.betas
    settings = (DemoSettings.quick(args.out, betas=betas, seed=args.seed) if args.quick
                else DemoSettings(out=args.out, betas=betas, seed=args.seed))
    summary = main_pipeline(settings)
    print()
    print(closing_table(summary))
    print(f"\ndemo wall time: {summary['wall_time_s']:.0f} s; results in {Path(args.out) / 'summary.json'}"
          + (f", report in {summary['report']}" if summary.get("report") else ""))
    return 0

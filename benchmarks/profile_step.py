"""Profile one preftune training step with torch.profiler: ``python -m benchmarks.profile_step``.

Builds the run exactly as the benchmark does (``run_preftune.prepare`` + ``train.fit``), lets
one step warm up, records the second one (collate, forward, reference, loss, backward,
optimizer), and prints the operators by self CPU time. Fixtures must exist (run bench first,
or this builds them).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from benchmarks.common import VARIANTS, Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=["7m", "34m"], default="34m")
    parser.add_argument("--variant", choices=list(VARIANTS), default="prefix")
    parser.add_argument("--fixtures", type=Path, default=Path(__file__).resolve().parent / "fixtures")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/preftune-profile"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--trace", type=Path, default=None, help="also write a Chrome trace here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.fixtures import build_fixtures
    from benchmarks.run_preftune import run_one

    torch.set_num_threads(args.threads)
    build_fixtures(args.fixtures, [args.model])
    settings = Settings(model=args.model, threads=args.threads, warmup_steps=1, timed_steps=1)
    profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=True)

    def on_step(step: int) -> None:
        if step == settings.warmup_steps:  # the collate call that opens the first timed step
            profiler.start()

    args.workdir.mkdir(parents=True, exist_ok=True)
    record = run_one(args.variant, settings, args.fixtures, args.workdir, on_step=on_step)
    profiler.stop()
    print(f"{args.variant} on {args.model}: {record['seconds']:.2f} s for the profiled step, "
          f"{record['real_tokens']} real tokens, peak RSS {record['peak_rss_bytes'] / 2**30:.2f} GiB")
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=48))
    print(profiler.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=12,
                                                                 max_name_column_width=40, max_shapes_column_width=60))
    if args.trace:
        profiler.export_chrome_trace(str(args.trace))


if __name__ == "__main__":
    main()

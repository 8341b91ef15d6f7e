"""The machine's fp32 matmul peak with the benchmark's thread count (``python -m benchmarks.peak``).

Achieved FLOP/s are reported against this number, measured in the same command as the runs, so
a busy or throttled machine lowers the ceiling and the runs alike.
"""

from __future__ import annotations

import argparse
import json
import time


def matmul_peak(threads: int, seconds: float, dtype: str = "float32") -> dict[str, float]:
    """Best FLOP/s of square matmuls (512, 1024, 2048) in ``dtype``, each timed for about ``seconds / 3``."""
    import torch

    torch.set_num_threads(threads)
    best: dict[str, float] = {}
    kind = getattr(torch, dtype)
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n).to(kind), torch.randn(n, n).to(kind)
        out = torch.empty(n, n, dtype=kind)
        torch.mm(a, b, out=out)  # warm-up: first-call allocation and kernel selection
        deadline = time.perf_counter() + seconds / 3
        rate = 0.0
        while True:
            started = time.perf_counter()
            torch.mm(a, b, out=out)
            elapsed = time.perf_counter() - started
            rate = max(rate, 2 * n**3 / elapsed)
            if time.perf_counter() > deadline:
                break
        best[str(n)] = rate
    return {"matmul_peak_flops_per_s": max(best.values()), "by_size": best, "threads": threads, "dtype": dtype}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    print(json.dumps(matmul_peak(args.threads, args.seconds, args.dtype)))


if __name__ == "__main__":
    main()

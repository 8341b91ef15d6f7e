"""bf16 autocast against fp32 by model size: ``python -m benchmarks.precision [--sizes ...] [--smoke] [--json FILE]``.

Where does bf16 autocast start to pay on a CPU? ``train.bf16: auto`` (issue 21, item 4) turns
it on for a CPU with bf16 matrix units (AMX or avx512_bf16, see ``preftune.system.hardware``) only from
some number of parameters up: on such a CPU a tiny model was reported to run slower in bf16
(autocast's casts cost more than its small matmuls save), a large one faster. This sweep
measures that crossover. **Rerun it on an AMX / avx512_bf16 machine to re-derive the threshold**
(``preftune.training.precision.AUTO_MIN_PARAMS``, printed next to the crossover). On a CPU without bf16
units (avx2 only) bf16 is emulated and the sweep shows only the cost side (no crossover expected).

Sizes: random-weight ``LlamaForCausalLM`` models from a ``LlamaConfig`` (untied head, SDPA
attention), shaped like real Llamas (head dim 64 from 4M up, intermediate about 8/3 of hidden,
vocabulary growing with the width):

- ``0.18m``: the demo model (``preftune demo``: hidden 64, 2 layers, 4 heads, vocabulary 400);
- ``1m``, ``4m``, ``10m``: in between;
- ``34m``: the benchmark model (``benchmarks.fixtures.MODELS["34m"]``, vocabulary 8192).

One size at a time, in this process: an fp32 model and an identical bf16-autocast one
(``torch.autocast("cpu", dtype=torch.bfloat16)`` over fp32 weights, what ``train.bf16: true``
does), each with its own AdamW (fused, as preftune's). One training step = forward with the
causal-LM loss (random token ids, batch 8 x 256 tokens by default), backward, AdamW step. Warm-up
steps first (each precision), then the timed steps alternate fp32 / bf16 so that a change in the
machine's load hits both; the median of each is reported. Torch threads: 2 by default.

``--size-seconds`` (default 120) caps one size's time, cutting its warm-ups and timed steps
(``measure``): where bf16 is emulated one step of the larger sizes takes minutes. On a
machine with bf16 units, ``--size-seconds 0`` runs every warm-up and timed step asked for.

Prints the processor (``preftune.system.hardware.cpu_info``), the load average, a table (params, fp32
s/step, bf16 s/step, bf16 speed-up = fp32 time / bf16 time, timed steps) and the crossover
estimate: the smallest size from which bf16 was faster at every larger size measured.
``--json FILE`` appends one JSON row per size (with ``machine``: processor, flags, cores, torch,
and the load averages). ``--smoke`` (CI): the two smallest sizes, 64 tokens a row, one warm-up
and one timed step.

The AMX figures that motivated it (reported by a user, Xeon with AMX, 2 cores, DPO step, batch
8, max length 512): the 0.18M demo model 1.5x slower in bf16 autocast, the 34M model 1.9x faster.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.fixtures import MODELS, VOCAB_SIZE


@dataclass(frozen=True)
class Size:
    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int


_H34, _L34, _A34, _I34 = MODELS["34m"]
#: smallest first
SIZES = {
    "0.18m": Size("0.18m", 64, 2, 4, 256, 400),  # the demo model (src/preftune/demo/pipeline.py)
    "1m": Size("1m", 128, 4, 4, 344, 1024),
    "4m": Size("4m", 256, 4, 4, 688, 2048),
    "10m": Size("10m", 320, 6, 5, 864, 4096),
    "34m": Size("34m", _H34, _L34, _A34, _I34, VOCAB_SIZE),  # the benchmark model (benchmarks/fixtures.py)
}


def build(size: Size, seq_len: int, seed: int = 0) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
                         num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
                         max_position_embeddings=max(1024, seq_len), tie_word_embeddings=False, use_cache=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.train()
    return model


def adamw(model: Any) -> Any:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    except (RuntimeError, TypeError):  # a torch without the fused CPU kernel
        return torch.optim.AdamW(params, lr=1e-4)


def train_step(model: Any, optimizer: Any, ids: Any, bf16: bool) -> tuple[float, float]:
    """One step's wall-clock seconds and its loss."""
    import torch

    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    return seconds, float(loss.detach())


#: a warm-up pair slower than this is the last warm-up: one-time costs are small against such a step
LONG_STEP_SECONDS = 10.0


def measure(size: Size, *, batch_size: int, seq_len: int, warmup: int, steps: int, size_seconds: float) -> dict[str, Any]:
    """Both precisions for one size: warm-up steps, then up to ``steps`` timed steps of each, alternating.

    ``size_seconds`` caps a size's time (where bf16 is emulated a step can take minutes): the first
    warm-up pair always runs; if it took more than half the cap it is also the one timed sample
    (``first_step_timed``); further warm-ups run only while a pair takes under
    :data:`LONG_STEP_SECONDS`; timed pairs (at least one) run while the next fits in the cap.
    """
    import torch

    loadavg_start = list(os.getloadavg())
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, size.vocab, (batch_size, seq_len), generator=generator)
    runs = {}
    for precision in ("fp32", "bf16"):
        model = build(size, seq_len)
        runs[precision] = {"model": model, "optimizer": adamw(model), "seconds": [], "losses": []}
    params = sum(p.numel() for p in runs["fp32"]["model"].parameters())

    def pair() -> tuple[dict[str, float], float]:
        seconds = {}
        for precision, run in runs.items():
            seconds[precision], loss = train_step(run["model"], run["optimizer"], ids, precision == "bf16")
            run["losses"].append(loss)
        return seconds, sum(seconds.values())

    first, last = pair()
    warmed, first_step_timed = 1, last > size_seconds / 2
    if first_step_timed:
        for precision, run in runs.items():
            run["seconds"].append(first[precision])
    else:
        while warmed < warmup and last < LONG_STEP_SECONDS and time.perf_counter() - started + last <= size_seconds:
            _, last = pair()
            warmed += 1
        while len(runs["fp32"]["seconds"]) < steps:
            if runs["fp32"]["seconds"] and time.perf_counter() - started + last > size_seconds:
                break
            seconds, last = pair()
            for precision, run in runs.items():
                run["seconds"].append(seconds[precision])
    for precision, run in runs.items():
        if not all(math.isfinite(x) for x in run["losses"]):
            raise RuntimeError(f"{size.name} {precision}: a loss was not finite: {run['losses']}")
    fp32, bf16 = (statistics.median(runs[p]["seconds"]) for p in ("fp32", "bf16"))
    row = {"benchmark": "precision", "size": size.name, "params": params, "shape": asdict(size), "batch_size": batch_size,
           "seq_len": seq_len, "tokens_per_step": batch_size * seq_len, "threads": torch.get_num_threads(),
           "warmup_steps": 0 if first_step_timed else warmed, "timed_steps": len(runs["fp32"]["seconds"]),
           "first_step_timed": first_step_timed, "size_seconds_cap": size_seconds,
           "fp32_seconds": fp32, "bf16_seconds": bf16, "bf16_speedup": fp32 / bf16,
           "fp32_step_seconds": runs["fp32"]["seconds"], "bf16_step_seconds": runs["bf16"]["seconds"],
           "fp32_losses": runs["fp32"]["losses"], "bf16_losses": runs["bf16"]["losses"],
           "seconds_total": time.perf_counter() - started, "loadavg_start": loadavg_start, "loadavg_end": list(os.getloadavg())}
    runs.clear()  # free both models before the next size
    gc.collect()
    return row


def crossover(rows: list[dict[str, Any]], bf16_units: bool) -> str:
    """The smallest size from which bf16 was faster at every larger size measured."""
    for i, row in enumerate(rows):
        if all(r["bf16_speedup"] > 1.0 for r in rows[i:]):
            text = f"bf16 faster from {row['size']} ({row['params'] / 1e6:.2f}M parameters) up"
            if i > 0:
                text += f"; slower at {rows[i - 1]['size']} ({rows[i - 1]['params'] / 1e6:.2f}M)"
            return text + ("" if bf16_units else " (odd on a CPU without bf16 units: rerun with more --steps)")
    faster = [r["size"] for r in rows if r["bf16_speedup"] > 1.0]
    if faster:
        return f"none here (bf16 faster at {', '.join(faster)} only, not at every larger size: noise? rerun with more --steps)"
    if not bf16_units:
        return "none here (bf16 emulated: no bf16 units)"
    return f"none here (bf16 slower at every size up to {rows[-1]['size']}: the threshold is above {rows[-1]['params'] / 1e6:.0f}M)"


def auto_threshold() -> str:
    """``preftune.training.precision.AUTO_MIN_PARAMS`` in words, to set against the crossover measured here."""
    try:
        from preftune.training.precision import AUTO_MIN_PARAMS
    except ImportError:
        return "unknown (no preftune.training.precision.AUTO_MIN_PARAMS)"
    return f"{AUTO_MIN_PARAMS:,} parameters (preftune.training.precision.AUTO_MIN_PARAMS)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per precision (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per precision (at least 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--size-seconds", type=float, default=120.0,
                        help="cap on one size's time: cuts its warm-up and timed steps (see measure); 0: no cap")
    parser.add_argument("--smoke", action="store_true", help="the two smallest sizes, 64 tokens a row, 1 warm-up and 1 timed step (CI)")
    parser.add_argument("--json", type=Path, default=None, help="append one JSON row per size here")
    args = parser.parse_args(argv)
    names = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in names if s not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}: choose from {', '.join(SIZES)}")
    if args.smoke:
        names, args.steps, args.warmup, args.seq_len = list(SIZES)[:2], 1, 1, 64
    args.warmup, args.steps = max(1, args.warmup), max(1, args.steps)
    cap = args.size_seconds if args.size_seconds > 0 else float("inf")
    names.sort(key=list(SIZES).index)

    import torch
    import transformers

    from benchmarks.common import machine
    from preftune.system.hardware import BF16_CPU_FLAGS, cpu_info

    torch.set_num_threads(args.threads)
    info, here = cpu_info(), machine()
    # the processor's own flags, not $PREFTUNE_CPU_BF16_UNITS (the tests' override of what auto sees)
    bf16_units = any(info["flags"][flag] for flag in BF16_CPU_FLAGS)
    started = time.perf_counter()
    flags = ", ".join(flag for flag, present in info["flags"].items() if present) or "none of the listed"
    print(f"processor: {info['cpu']} ({info['cores']} logical cores); flags: {flags}; "
          f"bf16 units ({' or '.join(BF16_CPU_FLAGS)}): {'yes' if bf16_units else 'no (bf16 is emulated)'}")
    print(f"torch {torch.__version__} (kernels: {info['torch_cpu_capability']}), transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads; batch {args.batch_size} x {args.seq_len} tokens; "
          f"{args.warmup} warm-up + {args.steps} timed steps per precision, at most {cap:.0f} s a size")
    print("load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()), flush=True)
    rows = []
    for name in names:
        row = measure(SIZES[name], batch_size=args.batch_size, seq_len=args.seq_len, warmup=args.warmup, steps=args.steps,
                      size_seconds=cap)
        row.update(smoke=args.smoke, bf16_units=bf16_units, machine=here, transformers=transformers.__version__)
        rows.append(row)
        print(f"{name}: {row['params']:,} parameters, fp32 {row['fp32_seconds']:.3f} s/step, bf16 {row['bf16_seconds']:.3f} s/step, "
              f"speed-up {row['bf16_speedup']:.3f}x; {row['warmup_steps']} warm-up + {row['timed_steps']} timed steps, "
              f"{row['seconds_total']:.0f} s (load {row['loadavg_end'][0]:.2f})", flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            with args.json.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
    print(f"\n{'size':<6} {'params':>12} {'fp32 s/step':>12} {'bf16 s/step':>12} {'bf16 speed-up':>14} {'timed':>6} {'load 1m':>8}")
    for r in rows:
        timed = f"{r['timed_steps']}{'*' if r['first_step_timed'] else ''}"
        print(f"{r['size']:<6} {r['params']:>12,} {r['fp32_seconds']:>12.3f} {r['bf16_seconds']:>12.3f} "
              f"{r['bf16_speedup']:>13.3f}x {timed:>6} {r['loadavg_end'][0]:>8.2f}")
    if any(r["first_step_timed"] for r in rows):
        print("* the first step timed, no warm-up: one step took over half of --size-seconds")
    print(f"\ncrossover: {crossover(rows, bf16_units)}")
    print(f"train.bf16 auto's threshold now: {auto_threshold()} (on a device with bf16 units)")
    print(f"processor: {info['cpu']}; load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"sweep took {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

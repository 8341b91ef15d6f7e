"""preftune against TRL, side by side: ``python -m benchmarks.bench [--smoke] [--model 7m|34m] [--runs ...]``.

Builds the fixtures (deterministic; reused when unchanged), measures the fp32 matmul peak,
then trains each run in its own process with the same settings (batch 8, max length 512,
beta 0.1, lr 5e-6, fp32, 2 threads, 2 warm-up + 20 timed optimizer steps), prints one JSON
line per run and a table with the ratios preftune/TRL, and checks that preftune's losses in
TRL's batch order match TRL's within 1e-4. A full run writes its JSON lines to
``benchmarks/results.jsonl``. ``--smoke`` runs every variant (the compiled ones only when
named in ``--runs``) for 2 steps on the 7M model and 16 records (all preftune variants in one
process, so it is quick; its timings mean nothing). ``sweep`` and ``trl-sweep`` (benchmarks/sweep.py)
put the cost of a 3-value beta sweep with one reference pass next to three separate TRL runs.
Exit status 1 when a run fails, a number is not finite, or the equivalence check (or the sweep's) fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import SMOKE_SKIP, SWEEP_RUNS, TRL_RUNS, VARIANTS, Settings, as_json, machine, versions
from benchmarks.report import bf16_cost, equivalence, finite, table
from benchmarks.sweep import sweep_cost

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ALL_RUNS = list(VARIANTS) + list(TRL_RUNS) + list(SWEEP_RUNS)


def child_env(settings: Settings, extra: dict[str, str], workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    threads = str(settings.threads)
    env.update({
        "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(workdir / "hf-home"),
        "TQDM_DISABLE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")])),
    })
    env.update(extra)
    return env


def start_child(module: str, runs: list[str], settings: Settings, fixtures: Path, workdir: Path,
                env_extra: dict[str, str]) -> tuple[subprocess.Popen, Path, Path]:
    """Start ``runs`` in one fresh process; its JSON lines go to the returned file, its output to the log."""
    out = workdir / f"{runs[0]}.jsonl"
    out.unlink(missing_ok=True)
    log = workdir / "logs" / f"{runs[0]}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", module, "--settings", as_json(settings), "--fixtures", str(fixtures),
               "--workdir", str(workdir), "--out", str(out), "--runs", ",".join(runs)]
    with log.open("w") as f:
        process = subprocess.Popen(command, cwd=REPO, env=child_env(settings, env_extra, workdir), stdout=f, stderr=subprocess.STDOUT)
    return process, out, log


def finish_child(process: subprocess.Popen, out: Path, log: Path) -> list[dict]:
    """Wait for a child; its JSON records, or a RuntimeError with the tail of its log."""
    code = process.wait()
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{' '.join(process.args[2:3])} failed (exit {code}); log {log}:\n{tail}")
    return [json.loads(line) for line in out.read_text().splitlines()]


def measure_peak(settings: Settings, workdir: Path, dtype: str = "float32") -> dict[str, Any]:
    seconds = "0.6" if settings.smoke else "3"
    command = [sys.executable, "-m", "benchmarks.peak", "--threads", str(settings.threads), "--seconds", seconds, "--dtype", dtype]
    done = subprocess.run(command, cwd=REPO, env=child_env(settings, {}, workdir), capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


#: The module every benchmark process runs (``python -m benchmarks.runners``): it runs any run by name.
RUNNER = "benchmarks.runners"


def plan(runs: list[str], smoke: bool) -> list[tuple[str, list[str], dict[str, str]]]:
    """(module, runs, environment) per process: one run each; a smoke run packs the runs that
    share an environment into one process (imports are most of its time): preftune's, then TRL's."""
    ours = [r for r in runs if r in VARIANTS]
    theirs = [r for r in runs if r in TRL_RUNS]
    # benchmarks/sweep.py's runs, beside each side's (trl-sweep starts one process per TRL run, not under --smoke)
    ours += [r for r in runs if r == "sweep"]
    theirs += [r for r in runs if r == "trl-sweep"]
    env_of = {**{r: spec.env for r, spec in TRL_RUNS.items()}, "trl-sweep": {}}
    if not smoke:
        return [(RUNNER, [r], {}) for r in ours] + [(RUNNER, [r], env_of[r]) for r in theirs]
    groups: list[tuple[str, list[str], dict[str, str]]] = [(RUNNER, ours, {})] if ours else []
    for env in {json.dumps(env_of[r], sort_keys=True) for r in theirs}:
        group = [r for r in theirs if json.dumps(env_of[r], sort_keys=True) == env]
        groups.append((RUNNER, group, json.loads(env)))
    return groups


def main(argv: list[str] | None = None) -> int:
    args, runs, settings = parse_arguments(argv)
    from benchmarks.fixtures import build_fixtures

    started = time.perf_counter()
    fixtures, manifest = build_fixtures(args.fixtures, [settings.model])
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="preftune-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    peak = measure_peak(settings, workdir)
    bf16_runs = [r for r in runs if (r in VARIANTS and VARIANTS[r].bf16) or (r in TRL_RUNS and TRL_RUNS[r].bf16)]
    peak_bf16 = measure_peak(settings, workdir, "bfloat16") if bf16_runs else None
    context = {"machine": machine(), "versions": versions(), "matmul_peak_flops_per_s": peak["matmul_peak_flops_per_s"],
               "fixtures_manifest_version": manifest["version"]}
    if peak_bf16:
        context["matmul_peak_bf16_flops_per_s"] = peak_bf16["matmul_peak_flops_per_s"]
    records, failed = run_children(plan(runs, settings.smoke), settings, fixtures.root, workdir, context, peak, peak_bf16)

    print()
    print(f"model {settings.model}, {settings.timed_steps} timed steps after {settings.warmup_steps} warm-up, batch "
          f"{settings.batch_size}, {settings.threads} threads; fp32 matmul peak {peak['matmul_peak_flops_per_s'] / 1e9:.0f} GFLOP/s; "
          f"load average {os.getloadavg()[0]:.2f}; {time.perf_counter() - started:.0f} s in all")
    print(table(records) if records else "no run finished")
    lines, same = equivalence(records)
    sweep_lines, sweep_same = sweep_cost(records)
    print("\n".join(lines + bf16_cost(records) + sweep_lines))
    bad = [r["run"] for r in records if not finite(r)]
    if bad:
        print(f"non-finite numbers in: {', '.join(bad)}", file=sys.stderr)
    if not settings.smoke and records:
        results = args.results or HERE / "results.jsonl"
        results.write_text("".join(json.dumps(r) + "\n" for r in records))
    return 1 if failed or bad or not same or not sweep_same else 0


def parse_arguments(argv: list[str] | None) -> tuple[argparse.Namespace, list[str], Settings]:
    """The command line: its arguments, the runs asked for (checked) and the settings they run with."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="every run for 2 steps on the 7M model and 16 records")
    parser.add_argument("--model", choices=["7m", "34m"], default="7m")
    parser.add_argument("--runs", default=None, help=f"comma-separated, from: {', '.join(ALL_RUNS)} (default: all; "
                        f"--smoke leaves out {', '.join(SMOKE_SKIP)} unless named)")
    parser.add_argument("--fixtures", type=Path, default=HERE / "fixtures", help="fixtures folder (built when missing)")
    parser.add_argument("--workdir", type=Path, default=None, help="run folders, logs, reference cache (default: a temp dir)")
    parser.add_argument("--results", type=Path, default=None, help="where a full run's JSON lines go (default benchmarks/results.jsonl)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timed-steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=2)
    args = parser.parse_args(argv)

    default = [r for r in ALL_RUNS if not (args.smoke and r in SMOKE_SKIP)]
    runs = [r.strip() for r in args.runs.split(",") if r.strip()] if args.runs else default
    unknown = [r for r in runs if r not in ALL_RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {ALL_RUNS}")
    if "cache-warm" in runs and "cache-cold" in runs and runs.index("cache-warm") < runs.index("cache-cold"):
        parser.error("cache-cold must come before cache-warm (the cold run writes the cache the warm one reads)")
    if args.smoke:
        # batches of 2 pairs and one thread per process: the three processes run side by side
        settings = Settings(model="7m", batch_size=2, threads=1, warmup_steps=1, timed_steps=1, smoke=True)
    else:
        settings = Settings(model=args.model, threads=args.threads, warmup_steps=args.warmup_steps, timed_steps=args.timed_steps)
    return args, runs, settings


def run_children(starts: list[tuple[str, list[str], dict[str, str]]], settings: Settings, fixtures: Path, workdir: Path,
                 context: dict[str, Any], peak: dict[str, Any], peak_bf16: dict[str, Any] | None) -> tuple[list[dict], bool]:
    """Run every process of :func:`plan`, printing each record as it comes; the records, and whether a process failed."""
    if settings.smoke:  # timings mean nothing here: start every process at once
        children = [start_child(m, g, settings, fixtures, workdir, e) for m, g, e in starts]
        found = [collect(child, context, peak, peak_bf16) for child in children]
    else:  # one process at a time, so no run slows another
        found = [collect(start_child(m, g, settings, fixtures, workdir, e), context, peak, peak_bf16) for m, g, e in starts]
    return [record for records in found if records for record in records], any(records is None for records in found)


def collect(child: tuple[subprocess.Popen, Path, Path], context: dict[str, Any], peak: dict[str, Any],
            peak_bf16: dict[str, Any] | None) -> list[dict] | None:
    """A finished child's records with the run's context and utilization, each printed; None (its log's tail printed) when it failed."""
    try:
        found = finish_child(*child)
    except RuntimeError as err:
        print(str(err), file=sys.stderr)
        return None
    for record in found:
        record.update(context)
        # a bf16 row against the bf16 matmul peak, an fp32 row against the fp32 one
        record["utilization"] = record["flops_per_s"] / (peak_bf16 if record.get("bf16") else peak)["matmul_peak_flops_per_s"]
        print(json.dumps(record), flush=True)
    return found


if __name__ == "__main__":
    sys.exit(main())

"""What every benchmark process shares: the settings, the batch order, and the measurements."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Settings:
    """The run settings, identical for preftune and TRL (the issue's: batch 8, max length 512, ...)."""

    model: str = "7m"
    batch_size: int = 8
    max_length: int = 512
    beta: float = 0.1
    lr: float = 5e-6
    warmup_steps: int = 2  # optimizer steps run before the clock starts
    timed_steps: int = 20
    threads: int = 2
    seed: int = 0
    smoke: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.timed_steps


@dataclass(frozen=True)
class Variant:
    """Which speed and memory work a run switches on."""

    order: str  # "random" (the order TRL is fed) or "grouped" (by length)
    logps: str  # "full" (all logits, log_softmax) or "chunked" (from hidden states, scored positions only)
    layout: str  # "concat" (prompt+chosen / prompt+rejected rows) or "shared" (prompt | chosen | rejected)
    reference: str  # "copy", "cache-cold", "cache-warm" or "adapter" (LoRA, adapter off)
    lora: bool = False
    unfused_adam: bool = False  # the single-tensor AdamW (~10 kernels per tensor), not preftune's fused default
    checkpointing: bool = False  # model.gradient_checkpointing: recompute activations in the backward
    compile: bool = False  # train.compile: decoder layers through torch.compile (its time is in the warm-up steps)
    bf16: bool = False  # train.bf16: bf16 autocast (log-probs and losses still summed in fp32)
    note: str = ""


VARIANTS = {
    "plain": Variant("random", "full", "concat", "copy", note="concatenated batch, right padding, no other tricks"),
    "grouped": Variant("grouped", "full", "concat", "copy", note="+ batches grouped by length"),
    "chunked": Variant("grouped", "chunked", "concat", "copy", note="+ log-probs in chunks from hidden states"),
    "prefix": Variant("grouped", "chunked", "shared", "copy", note="+ prefix sharing: preftune's defaults"),
    "cache-cold": Variant("grouped", "chunked", "shared", "cache-cold", note="+ reference cache, computed in this run"),
    "cache-warm": Variant("grouped", "chunked", "shared", "cache-warm", note="+ reference cache, read from disk"),
    "unfused-adam": Variant("grouped", "chunked", "shared", "copy", unfused_adam=True,
                            note="prefix, but the single-tensor AdamW instead of preftune's fused one (patched in)"),
    "checkpointing": Variant("grouped", "chunked", "shared", "copy", checkpointing=True,
                             note="+ gradient checkpointing (model.gradient_checkpointing=true): memory for compute"),
    "lean": Variant("grouped", "chunked", "shared", "cache-warm", checkpointing=True,
                    note="cache-warm + gradient checkpointing: no reference model in memory, activations recomputed"),
    "lora": Variant("grouped", "chunked", "shared", "adapter", lora=True, note="LoRA r16, reference = adapter off"),
    "parity": Variant("random", "chunked", "shared", "copy", note="prefix sharing in TRL's batch order: the equivalence run"),
    "compile": Variant("grouped", "chunked", "shared", "copy", compile=True,
                       note="prefix + train.compile=true (compile time in the warm-up steps, reported as compile_seconds)"),
    "compile-lean": Variant("grouped", "chunked", "shared", "cache-warm", checkpointing=True, compile=True,
                            note="lean + train.compile=true"),
    "bf16": Variant("grouped", "chunked", "shared", "copy", bf16=True, note="prefix + bf16 autocast (compared with trl-bf16)"),
}

#: Runs the smoke mode (CI) leaves out unless named: compiling costs minutes on 2 cores.
SMOKE_SKIP = ("compile", "compile-lean")


#: glibc settings that keep freed memory mapped: they speed TRL up (the issue measured 1.4x).
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


@dataclass(frozen=True)
class TrlRun:
    """A TRL run: its environment, and whether it trains a LoRA adapter."""

    env: dict[str, str] = field(default_factory=dict)
    lora: bool = False
    bf16: bool = False  # TRL's own default (bf16=True): autocast in bf16
    note: str = ""


TRL_RUNS = {
    "trl": TrlRun(note="TRL 1.16 DPOTrainer, reference = a second copy"),
    "trl-malloc": TrlRun(env=MALLOC_ENV, note="the same, with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=64GiB"),
    "trl-lora": TrlRun(lora=True, note="TRL with LoRA r16, reference = adapter off"),
    "trl-bf16": TrlRun(bf16=True, note="TRL with bf16=True (its default), reference = a second copy"),
}

#: A beta sweep's cost (benchmarks/sweep.py): preftune's sweep, one reference pass, against three TRL runs.
SWEEP_RUNS = ("sweep", "trl-sweep")

#: Which TRL run each preftune run is compared with in the table.
BASELINE = {"lora": "trl-lora", "bf16": "trl-bf16", "sweep": "trl-sweep"}


def add_child_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--settings", required=True, help="JSON of benchmarks.common.Settings")
    parser.add_argument("--fixtures", required=True, type=Path)
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="JSON lines are appended here")
    parser.add_argument("--runs", required=True, help="comma-separated run names")


def child_main(run: Any, description: str | None) -> None:
    """A runner process: parse the arguments bench.py passes, then ``run(name, settings, fixtures, workdir)`` per run."""
    parser = argparse.ArgumentParser(description=description)
    add_child_arguments(parser)
    args = parser.parse_args()
    settings = settings_from(args.settings)
    limit_threads(settings.threads)
    for name in args.runs.split(","):
        append_json(args.out, run(name, settings, args.fixtures, args.workdir))


def dpo_config(settings: Settings, variant: Variant, model_dir: Path, records: Path, run_dir: Path, cache_dir: Path) -> Any:
    from preftune.config.schema import (
        DataConfig,
        DPOConfig,
        LoraConfig,
        LossConfig,
        ModelConfig,
        ReferenceConfig,
        TrainConfig,
    )

    lora = LoraConfig(enabled=variant.lora, r=settings.lora_r, alpha=settings.lora_alpha, target_modules=list(settings.lora_targets))
    return DPOConfig(
        model=ModelConfig(path=str(model_dir), dtype="float32", lora=lora, gradient_checkpointing=variant.checkpointing),
        data=DataConfig(train=[str(records)], max_length=settings.max_length, max_prompt_length=settings.max_length,
                        group_by_length=variant.order == "grouped", prefix_sharing=variant.layout == "shared"),
        loss=LossConfig(name="dpo", beta=settings.beta),
        reference=ReferenceConfig(strategy="cache" if variant.reference.startswith("cache") else variant.reference,
                                  cache_dir=str(cache_dir)),
        train=TrainConfig(output_dir=str(run_dir), seed=settings.seed, max_steps=settings.total_steps, batch_size=settings.batch_size,
                          lr=settings.lr, scheduler="constant", warmup_steps=0, max_grad_norm=1.0, log_every=1, progress=False,
                          compile=variant.compile, bf16=variant.bf16),
    )


def preftune_pairs(settings: Settings, model_dir: Path, records: Path, workdir: Path) -> list:
    """preftune's tokenization of the same records: the ids TRL must reproduce (run_trl and the sweep)."""
    from preftune.data.prepare import prepare
    from preftune.models.tokenizer import load_tokenizer

    cfg = dpo_config(settings, VARIANTS["plain"], model_dir, records, workdir, workdir / "reference-cache")
    return prepare(cfg.data, load_tokenizer(str(model_dir)), records="pairs", seed=cfg.train.seed).train


def settings_from(text: str) -> Settings:
    return Settings(**json.loads(text))


def limit_threads(threads: int) -> None:
    """Pin torch's intra-op threads (the parent also sets OMP/MKL_NUM_THREADS in the environment)."""
    import torch

    torch.set_num_threads(threads)


def batch_order(n_items: int, lengths: list[int], settings: Settings, *, grouped: bool) -> list[list[int]]:
    """The batches of epoch 0 as preftune's sampler draws them (what ``train.fit`` runs).

    The random (not grouped) order does not depend on ``lengths``: it is the order TRL is fed,
    so both see the same batches in the same order.
    """
    from preftune.data.collate import LengthGroupedBatchSampler

    sampler = LengthGroupedBatchSampler(lengths, settings.batch_size, seed=settings.seed, shuffle=True, group_by_length=grouped)
    sampler.set_epoch(0)
    batches = list(sampler)
    assert sum(len(b) for b in batches) == n_items
    return batches


def real_tokens(pair: Any) -> int:
    """Tokens of prompt+chosen plus prompt+rejected: the work, whatever the layout or padding."""
    return 2 * len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def flop_params(model_dir: Path) -> int:
    """N of the 6N/2N rule: every parameter except the input embedding table (a lookup, no matmul)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                if "embed_tokens" in name:
                    continue
                shape = f.get_slice(name).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += count
    return total


class StepClock:
    """Wall-clock marks at step boundaries: ``mark(step)`` when optimizer step ``step`` has ended."""

    def __init__(self) -> None:
        self.marks: dict[int, float] = {}

    def mark(self, step: int) -> None:
        self.marks[step] = time.perf_counter()

    def timed_seconds(self, settings: Settings) -> float:
        return self.marks[settings.total_steps] - self.marks[settings.warmup_steps]


def result(
    *, run: str, framework: str, settings: Settings, model_dir: Path, seconds: float, tokens: int, reference_tokens: int,
    losses: list[float], metrics: dict[str, list[float]], extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One run's JSON record. FLOPs: 6N per trained token + 2N per token the reference scored."""
    n = flop_params(model_dir)
    flops = 6 * n * tokens + 2 * n * reference_tokens
    record = {
        "run": run,
        "framework": framework,
        "model": settings.model,
        "smoke": settings.smoke,
        "timed_steps": settings.timed_steps,
        "warmup_steps": settings.warmup_steps,
        "batch_size": settings.batch_size,
        "threads": settings.threads,
        "real_tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "flop_params": n,
        "flops": flops,
        "flops_per_s": flops / seconds,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "losses": losses,
        **{f"per_step/{k}": v for k, v in metrics.items()},
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        # 1, 5 and 15 minute load averages as the run ends: on a shared machine, read timings with these
        "loadavg_end": list(os.getloadavg()),
    }
    record.update(extra or {})
    return record


def append_json(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "tokenizers": tokenizers.__version__}
    try:
        import trl

        out["trl"] = trl.__version__
    except ImportError:
        out["trl"] = "not installed"
    return out


def machine() -> dict[str, Any]:
    """The processor a row ran on (model name, the flags that decide matmul speed, cores, torch):
    rows from different machines are never compared (``report.check_one_machine``)."""
    from preftune.system.hardware import cpu_info

    info = cpu_info()
    return {"cpu": info["cpu"], "cpu_flags": info["flags"], "cores": info["cores"], "torch": info["torch"],
            "torch_cpu_capability": info["torch_cpu_capability"], "platform": platform.platform(),
            "loadavg_1m": os.getloadavg()[0]}


def machine_key(record: dict[str, Any]) -> str:
    """What must be equal for two rows to be compared: processor, flags, cores, torch."""
    m = record.get("machine") or {}
    flags = ",".join(sorted(k for k, v in (m.get("cpu_flags") or {}).items() if v)) or "flags unknown"
    return f"{m.get('cpu', 'unknown cpu')} [{flags}] x{m.get('cores', '?')} torch {m.get('torch', '?')}"


def as_json(settings: Settings) -> str:
    return json.dumps(asdict(settings))

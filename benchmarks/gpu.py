"""The GPU path: preftune against TRL 1.16 at its fastest, on a Llama with real 1B shapes.

``python -m benchmarks.gpu [--batch 8] [--runs preftune,preftune-cache,trl,attention]`` on a CUDA
machine; ``python -m benchmarks.gpu --tiny --device cpu`` runs the same code end to end on a tiny
model in about a minute (tests/test_benchmark_gpu.py), so the script is known to work before a
GPU is lent. Without CUDA (and without ``--device cpu``) it says that the GPU numbers are missing.

The model: Llama 3.2 1B's shapes (hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192,
vocabulary 128256, tied embeddings), random weights, bf16 autocast on fp32 master weights; rows
of up to 2048 tokens (prompts ~1000, completions ~500 tokens). Each run trains in its own process
(so its peak memory is its own) for ``--warmup`` + ``--steps`` optimizer steps on the same pairs:

- ``preftune``: ``preftune dpo``'s defaults (prefix sharing, chunked log-probs, frozen reference
  copy, precision auto = bf16 on a bf16 GPU, ``train.compile: auto`` = on under CUDA);
- ``preftune-cache``: the same with the reference log-probs cached on disk first (the cache pass
  is timed and reported apart, as TRL's precomputation is);
- ``trl``: ``DPOTrainer`` with ``bf16=True``, ``precompute_ref_log_probs=True``, no gradient
  checkpointing (its default is on; off is faster where memory allows), ``use_liger_kernel`` when
  ``liger_kernel`` is installed; ``padding_free`` is requested only if this TRL supports it
  (1.16 disables it with a warning: "temporarily unavailable"), which the row records;
- ``attention``: the prefix-shared attention alone (fwd+bwd of one layer's attention at 1B
  shapes): SDPA with the 4D block mask preftune uses, ``flex_attention`` with the same block
  mask, and SDPA's causal kernel on two plain rows (P+C, P+R), the work TRL does.

Reported per run: real tokens/s (2P+C+R per pair), peak device memory, and MFU: model FLOPs
(6N per trained token + 2N per reference-scored token) over the device's dense bf16 peak (the
datasheet's when the device is known, and the measured bf16 matmul peak in any case).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RUNS = ("preftune", "preftune-cache", "trl", "attention")
#: dense bf16 tensor-core peaks from the datasheets (FLOP/s), by a substring of the device name
DATASHEET_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}
#: (hidden, layers, heads, kv heads, intermediate, vocabulary, prompt tokens, completion tokens)
SHAPES = {"1b": (2048, 16, 32, 8, 8192, 128256, (900, 1100), (400, 600)),
          "tiny": (64, 2, 4, 2, 128, 8192, (30, 60), (20, 40))}


def device_peak(device: str) -> dict[str, Any]:
    """The device's name, its datasheet bf16 peak (if known), and a measured bf16 matmul peak."""
    import torch

    n = 8192 if device == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best = 0.0
    for _ in range(10 if device == "cuda" else 3):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - started))
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    sheet = next((v for k, v in DATASHEET_BF16.items() if k in name), None)
    return {"device_name": name, "datasheet_bf16_flops": sheet, "measured_bf16_matmul_flops": best}


def build(root: Path, size: str, pairs: int) -> tuple[Path, Path]:
    """A random-weight Llama of ``size``'s shapes and ``pairs`` records of its lengths (the
    benchmark fixtures' tokenizer and synthetic language, so TRL and preftune tokenize alike)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.fixtures import _Language, _text_of_tokens, build_fixtures
    from preftune.models.tokenizer import load_tokenizer

    fx, _ = build_fixtures(root / "fixtures", ["7m"])
    tokenizer = load_tokenizer(str(fx.root / "tokenizer"))
    hidden, layers, heads, kv, inter, vocab, prompt, completion = SHAPES[size]
    model_dir = root / f"model-{size}"
    if not (model_dir / "config.json").is_file():
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                             rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    records = root / f"records-{size}-{pairs}.jsonl"
    if not records.is_file():
        rng = random.Random(0)
        lang, counts = _Language(rng), {}
        with records.open("w", encoding="utf-8") as f:
            for _ in range(pairs):
                row = {"prompt": _text_of_tokens(lang, tokenizer, rng.randint(*prompt), counts, lead_space=False),
                       "chosen": _text_of_tokens(lang, tokenizer, rng.randint(*completion), counts, lead_space=True),
                       "rejected": _text_of_tokens(lang, tokenizer, rng.randint(*completion), counts, lead_space=True)}
                f.write(json.dumps(row) + "\n")
    return model_dir, records


def model_flop_params(model: Any) -> int:
    """N of 6N: every parameter but the embedding lookup; a tied head is a matmul, counted once."""
    embedding = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p is not embedding) + embedding.numel()


def peak_memory(device: str) -> int:
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    from benchmarks.common import peak_rss_bytes

    return peak_rss_bytes()


def run_preftune(name: str, args: argparse.Namespace, model_dir: Path, records: Path, work: Path) -> dict[str, Any]:
    import dataclasses

    from benchmarks.common import StepClock, real_tokens
    from preftune.config.schema import DPOConfig, build_config
    from preftune.stages.dpo import build_task
    from preftune.stages.lifecycle import open_run

    cache = name == "preftune-cache"
    overrides = {"model": {"path": str(model_dir)}, "data": {"train": [str(records)], "max_length": 2048, "max_prompt_length": 2048},
                 "reference": {"strategy": "cache" if cache else "copy", "cache_dir": str(work / "ref-cache")},
                 "train": {"output_dir": str(work / name), "max_steps": args.warmup + args.steps, "batch_size": args.batch,
                           "lr": 5e-6, "scheduler": "constant", "log_every": 1, "progress": False, "report": False,
                           "bf16": True if args.device == "cpu" else None,  # CPU (tiny): the GPU's bf16 path, forced
                           "compile": False if args.device == "cpu" else "auto"}}
    cfg = build_config(DPOConfig, overrides)
    clock, steps = StepClock(), []
    with open_run(cfg) as run:
        started = time.perf_counter()
        task = build_task(cfg, run)
        setup = time.perf_counter() - started

        def timed_collate(items: list) -> dict:
            clock.mark(len(steps))
            steps.append([real_tokens(p) for p in items])
            return task.collate(items)

        run.fit(dataclasses.replace(task, collate=timed_collate))
    clock.mark(len(steps))
    tokens = sum(sum(s) for s in steps[args.warmup :])
    seconds = clock.marks[len(steps)] - clock.marks[args.warmup]
    reference = json.loads((work / name / "reference.json").read_text())
    lines = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines()]
    n = model_flop_params(task.output)
    return {"tokens": tokens, "seconds": seconds, "flops": (6 * n + (0 if cache else 2 * n)) * tokens,
            "setup_seconds": setup, "reference": reference, "compile_seconds": lines[-1].get("compile/seconds", 0.0),
            "losses": [x["loss"] for x in lines if "loss" in x]}


def run_trl(args: argparse.Namespace, model_dir: Path, records: Path, work: Path) -> dict[str, Any]:
    import importlib.util
    import inspect

    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from benchmarks.common import StepClock

    rows = [json.loads(x) for x in records.read_text(encoding="utf-8").splitlines()]
    liger = importlib.util.find_spec("liger_kernel") is not None
    source = inspect.getsource(DPOTrainer.__init__)
    padding_free = "temporarily unavailable" not in source  # TRL 1.16 turns it off with a warning
    notes = [f"use_liger_kernel={'on' if liger else 'off: liger_kernel is not installed'}",
             f"padding_free={'on' if padding_free else 'off: this TRL disables it (temporarily unavailable)'}"]
    config = DPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
                       learning_rate=5e-6, lr_scheduler_type="constant", beta=0.1, loss_type=["sigmoid"], max_length=2048,
                       precompute_ref_log_probs=True, bf16=True, gradient_checkpointing=False, padding_free=padding_free,
                       use_liger_kernel=liger, model_init_kwargs={"dtype": "float32"}, use_cpu=args.device == "cpu",
                       logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
                       train_sampling_strategy="sequential", dataloader_num_workers=0)
    clock, logged, tokens = StepClock(), [], []

    class Measure(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN003
            clock.mark(state.global_step)

        def on_log(self, a, state, control, logs=None, **kw):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN003
            if logs and "loss" in logs:
                logged.append(logs["loss"])

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    trainer = DPOTrainer(model=str(model_dir), args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[Measure()])
    data = trainer.train_dataset
    for k in range(args.batch * (args.warmup + args.steps)):
        row = data[k % len(data)]
        tokens.append(2 * len(row["prompt_ids"]) + len(row["chosen_ids"]) + len(row["rejected_ids"]))
    started = time.perf_counter()
    trainer.train()
    timed = sum(tokens[args.batch * args.warmup :])
    n = model_flop_params(trainer.model)
    return {"tokens": timed, "seconds": clock.marks[args.warmup + args.steps] - clock.marks[args.warmup],
            "flops": 6 * n * timed, "setup_seconds": clock.marks[1] - started, "notes": notes, "losses": logged}


def run_attention(args: argparse.Namespace) -> dict[str, Any]:
    """fwd+bwd of one attention at the model's shapes: block mask (SDPA, flex) vs two plain rows."""
    import torch
    import torch.nn.functional as F

    hidden, _, heads, kv, _, _, prompt, completion = SHAPES["tiny" if args.tiny else "1b"]
    dim, device, dtype = hidden // heads, args.device, torch.bfloat16
    p, c, r, b = prompt[1], completion[1], completion[1], args.batch
    width = p + c + r
    pos = torch.arange(width, device=device)
    in_prompt, in_chosen = pos < p, (pos >= p) & (pos < p + c)

    def allowed(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # causal, and a rejected token never sees a chosen one
        return (k <= q) & ~(in_chosen[k] & ~in_prompt[q] & ~in_chosen[q])

    mask = allowed(pos[:, None], pos[None, :])[None, None]
    out: dict[str, Any] = {"shape": {"batch": b, "prompt": p, "completion": c, "heads": heads, "kv_heads": kv, "head_dim": dim}}

    def timed(fn: Any, *shapes: tuple[int, ...]) -> float:
        tensors = [torch.randn(*s, device=device, dtype=dtype, requires_grad=True) for s in shapes]
        for i in range(4):
            if i == 1:  # the first call compiles (flex) or picks kernels
                if device == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
            fn(*tensors).float().sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - started) / 3

    sdpa_mask = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # noqa: E731
    out["sdpa_block_mask_s"] = timed(sdpa_mask, (b, heads, width, dim), (b, kv, width, dim), (b, kv, width, dim))
    two = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    out["sdpa_two_plain_rows_s"] = timed(two, (2 * b, heads, p + c, dim), (2 * b, kv, p + c, dim), (2 * b, kv, p + c, dim))
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block = create_block_mask(lambda _b, _h, q, k: allowed(q, k), None, None, width, width, device=device)
        flex = torch.compile(flex_attention) if device == "cuda" else flex_attention
        fn = lambda q, k, v: flex(q, k, v, block_mask=block, enable_gqa=True)  # noqa: E731
        out["flex_block_mask_s"] = timed(fn, (b, heads, width, dim), (b, kv, width, dim), (b, kv, width, dim))
    except Exception as err:  # noqa: BLE001 - reported, not fatal: the other two still compare
        out["flex_block_mask_s"] = None
        out["flex_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    timings = {k: v for k, v in out.items() if k.endswith("_s") and v}
    out["fastest"] = min(timings, key=timings.get)
    return out


def child(args: argparse.Namespace) -> None:
    """One run in this process; its JSON record on the last line of stdout."""
    import torch

    torch.manual_seed(0)
    work = Path(args.workdir)
    model_dir, records = build(work, "tiny" if args.tiny else "1b", args.pairs)
    if args.child == "attention":
        record: dict[str, Any] = run_attention(args)
    else:
        record = run_trl(args, model_dir, records, work) if args.child == "trl" else run_preftune(args.child, args, model_dir, records, work)
        peak = device_peak(args.device)
        record.update(peak, tokens_per_s=record["tokens"] / record["seconds"], flops_per_s=record["flops"] / record["seconds"])
        record["mfu_datasheet"] = record["flops_per_s"] / peak["datasheet_bf16_flops"] if peak["datasheet_bf16_flops"] else None
        record["mfu_measured"] = record["flops_per_s"] / peak["measured_bf16_matmul_flops"]
    record.update(run=args.child, peak_memory_bytes=peak_memory(args.device), device=args.device, tiny=args.tiny, batch=args.batch)
    print(json.dumps(record, default=str))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and short rows (the CPU check of the script)")
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--batch", type=int, default=None, help="pairs per step (default 8 on CUDA, 2 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; 1 with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 2 with --tiny)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pairs", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch = args.batch or (2 if args.tiny else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.steps = args.steps or (2 if args.tiny else 10)
    args.pairs = args.pairs or args.batch * (args.warmup + args.steps)
    if args.child:
        child(args)
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("GPU numbers missing: no GPU was lent (torch.cuda.is_available() is False). "
              "Run `python -m benchmarks.gpu` on a CUDA machine, or `--tiny --device cpu` to check the script.")
        return 0
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="preftune-gpu-")
    records, failed = [], False
    for run in [r.strip() for r in args.runs.split(",") if r.strip()]:
        command = [sys.executable, "-m", "benchmarks.gpu", "--child", run, "--device", args.device, "--batch", str(args.batch),
                   "--warmup", str(args.warmup), "--steps", str(args.steps), "--pairs", str(args.pairs), "--workdir", args.workdir]
        env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
        done = subprocess.run(command + (["--tiny"] if args.tiny else []), cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{run} failed (exit {done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr)
            failed = True
            continue
        record = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(record), flush=True)
        records.append(record)
    for r in records:
        if r["run"] == "attention":
            print(f"attention ({r['shape']}): SDPA block mask {r['sdpa_block_mask_s']:.4f} s, flex block mask "
                  f"{r['flex_block_mask_s'] or float('nan'):.4f} s, SDPA two plain rows {r['sdpa_two_plain_rows_s']:.4f} s; "
                  f"fastest: {r['fastest']}")
        else:
            mfu = f"{100 * r['mfu_datasheet']:.1f}%" if r.get("mfu_datasheet") else "n/a (device not in the datasheet table)"
            print(f"{r['run']}: {r['tokens_per_s']:.0f} tokens/s, peak memory {r['peak_memory_bytes'] / 2**30:.2f} GiB, "
                  f"MFU {mfu} (of the measured bf16 matmul peak: {100 * r['mfu_measured']:.1f}%) {'; '.join(r.get('notes', []))}")
    if args.device != "cuda":
        print("GPU numbers missing: no GPU was lent; these are CPU numbers of the script's check and measure nothing.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

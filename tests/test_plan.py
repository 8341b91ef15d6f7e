"""`preftune plan`: per-device memory from config.json alone, checked against measured peaks.

The measured peak is the most live tensor bytes during a real `preftune.dpo` run of two steps
on CPU (the policy's parameters, which exist before, plus every allocation and free of the CPU
allocator recorded by torch's profiler with ``profile_memory``, replayed in time order). The plan's
estimate for the same model, batch and lengths must be within 25% of it, for every strategy that
runs on CPU: single (frozen copy as reference), cached reference, LoRA, gradient checkpointing,
bf16 autocast, and the concatenated layout.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import REPO, run_cli, run_python

#: name -> (hidden, layers, heads, intermediate, vocab): the tiny model and the 34M benchmark model
MODELS = {"tiny": (32, 2, 4, 128, 512), "34m": (512, 8, 8, 1376, 8192)}
PROMPT_WORDS, COMPLETION_WORDS = 96, 64  # one token per word, plus BOS and EOS
BATCH = {"tiny": 4, "34m": 2}  # pairs per process: the 34M model's steps are the slow ones


def llama(name: str):  # noqa: ANN201
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, mlp, vocab = MODELS[name]
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                                        num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=False,
                                        attn_implementation="sdpa", pad_token_id=0, bos_token_id=1, eos_token_id=2))


@functools.cache
def tiny_tokenizer():  # noqa: ANN201
    from preftune.models.tiny import synthetic_corpus, train_tokenizer

    return train_tokenizer(synthetic_corpus())


def records(n: int, words: int = COMPLETION_WORDS) -> list[dict[str, str]]:
    from preftune.models.tiny import BAD_WORDS, GOOD_WORDS, NEUTRAL_WORDS

    rng = random.Random(0)
    text = lambda pool, k: " ".join(rng.choice(pool) for _ in range(k))  # noqa: E731
    return [{"prompt": text(NEUTRAL_WORDS, PROMPT_WORDS), "chosen": " " + text(GOOD_WORDS, words),
             "rejected": " " + text(BAD_WORDS, words)} for _ in range(n)]


def measured_peak(fn, baseline: int) -> int:  # noqa: ANN001
    """``baseline`` + the highest running total of CPU allocations minus frees while ``fn`` runs."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    running = peak = 0
    for _, size in sorted(allocations):
        running += size
        peak = max(peak, running)
    return baseline + peak


STRATEGIES = {
    "single": ({}, {}),
    "cached reference": ({"reference": {"strategy": "cache"}}, {"reference": "cache"}),
    "lora": ({"lora": {"enabled": True, "target_modules": ["q_proj", "v_proj"]}}, {"lora": ("q_proj", "v_proj"), "reference": "adapter"}),
    "gradient checkpointing": ({"gradient_checkpointing": True}, {"checkpointing": True}),
    "bf16 autocast": ({"bf16": True}, {"bf16": True}),
    "concatenated": ({"prefix_sharing": False}, {"prefix_sharing": False}),
}
CASES = ([("tiny", "dpo", s) for s in STRATEGIES] + [("34m", "dpo", s) for s in ("single", "lora")]
         + [("tiny", stage, s) for stage in ("sft", "rm") for s in ("single", "gradient checkpointing")])
# the tiny cases are measured in fp32 (auto keeps tiny models there). One per stage runs again as on a CPU with AMX
# (conftest.py): precision is decided before the strategy is, so the others would profile the same decision again.
CASES = [pytest.param(*case, marks=pytest.mark.fp32_exact) if case[0] == "tiny" and case[2] == "single" else case for case in CASES]


def rss() -> tuple[int, int]:
    """(resident bytes now, the process's highest resident bytes so far), from /proc and getrusage (Linux)."""
    import resource

    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(model_name: str, stage: str, strategy: str, out: Path, processes: int = 1, sharding: str = "none",
            profiled: bool = True) -> tuple[int, ...]:
    """(planned peak, measured peak of live tensors, RSS before the run, highest RSS after it) in bytes of two
    steps of ``stage`` with ``strategy``, per process; ``sharding``: data parallel (none) or fsdp. Sharded, the
    model is built inside the profiled run: sharding frees its full parameters, and the profiler records no
    free of a tensor allocated before it started. ``profiled=False``: RSS only (the profiler's records are
    resident too), the live peak -1."""
    import preftune
    from preftune.training.memory import Setup, estimate, shape_of

    settings, setup = STRATEGIES[strategy]
    if "reference" in settings:
        settings = {"reference": {**settings["reference"], "cache_dir": str(out / "cache")}}
    if sharding != "none":
        settings = {**settings, "sharding": sharding}
    tokenizer = tiny_tokenizer()
    batch = BATCH[model_name]
    data = records(2 * batch * processes)
    assert len(tokenizer(data[0]["prompt"])["input_ids"]) == PROMPT_WORDS + 1  # one token a word, and BOS
    if stage == "sft":
        data = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in data]
    train = {"dpo": preftune.dpo, "sft": preftune.sft, "rm": preftune.reward_model}[stage]
    model = llama(model_name) if sharding == "none" else None
    config = model.config if model is not None else llama(model_name).config
    baseline = sum(p.numel() * p.element_size() for p in model.parameters()) if model is not None else 0
    rss_before = rss()[0]

    def run() -> None:
        train(model or llama(model_name), train_data=data, tokenizer=tokenizer, output_dir=str(out / f"run-{sharding}-{profiled}"),
              batch_size=batch, max_steps=2, progress=False, report=False, max_length=512, max_prompt_length=256, **settings)

    peak = measured_peak(run, baseline) if profiled else run() or -1
    base = Setup("single", stage, batch, PROMPT_WORDS + 1, COMPLETION_WORDS + 1, True, 1024, "float32", "adamw",
                 reference="copy" if stage == "dpo" else "none", devices=processes,
                 sharding=sharding if sharding != "none" else "ddp" if processes > 1 else "none")
    return estimate(shape_of(config), replace(base, **setup))["peak"], peak, rss_before, rss()[1]


@pytest.mark.full
@pytest.mark.slow
@pytest.mark.parametrize(("model_name", "stage", "strategy"), CASES)
def test_estimate_within_25_percent_of_measured_peak(model_name: str, stage: str, strategy: str, tmp_path: Path) -> None:
    planned, peak, *_ = measure(model_name, stage, strategy, tmp_path)
    assert planned == pytest.approx(peak, rel=0.25), (model_name, stage, strategy, planned / 2**20, peak / 2**20)


@pytest.mark.full
@pytest.mark.slow
def test_ddp_and_fsdp_estimates_per_process_within_25_percent(tmp_path: Path) -> None:
    """Two processes (torchrun, gloo; one launch), each measuring its own peak of live tensors: data parallel,
    and sharded (train.sharding=fsdp). This file run as a script. The plan's peak is live tensor bytes;
    the process's RSS adds the libraries and the allocator's slack, so it is only required to lie above it."""
    port = __import__("socket").create_server(("127.0.0.1", 0))
    free = port.getsockname()[1]
    port.close()
    run = run_python("-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={free}", __file__,
                     str(tmp_path), env={"OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    peaks = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert sorted(p["sharding"] for p in peaks) == ["fsdp", "fsdp", "none", "none"]
    for p in peaks:
        planned, peak, _, rss_peak = p["bytes"]
        assert planned == pytest.approx(peak, rel=0.25), (p["sharding"], planned / 2**20, peak / 2**20)
        assert rss_peak > peak


def test_shapes_and_sharding_arithmetic() -> None:
    from preftune.training.memory import Setup, estimate, largest_batch, parse_bytes, shape_of

    model = llama("34m")
    shape = shape_of(model.config)
    assert shape.params() == sum(p.numel() for p in model.parameters())
    base = Setup("single", "dpo", 4, 128, 64, True, 1024, "float32", "adamw")
    single, fsdp = estimate(shape, base), estimate(shape, replace(base, sharding="fsdp", devices=8))
    assert fsdp["parameters"] * 8 >= single["parameters"] > fsdp["parameters"] * 7
    assert estimate(shape, replace(base, sharding="ddp", devices=8))["peak"] == single["peak"] + single["gradients"]
    memory = parse_bytes("2GiB")
    best = largest_batch(shape, base, memory)
    assert estimate(shape, replace(base, batch=best))["peak"] <= memory < estimate(shape, replace(base, batch=best + 1))["peak"]
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("24GB") == 24 * 10**9
    from transformers import MixtralConfig

    from preftune.errors import PreftuneError

    with pytest.raises(PreftuneError, match="mixture of 8 experts"):
        shape_of(MixtralConfig(num_local_experts=8))
    with pytest.raises(PreftuneError, match="not a memory size"):
        parse_bytes("80 parsecs")


@pytest.mark.full
def test_cli_plan_table_and_json_from_config_json_alone(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from preftune.cli.main import main

    folder = tmp_path / "model"
    folder.mkdir()
    model = llama("34m")
    model.config.to_json_file(str(folder / "config.json"))  # no weights: the plan reads the config only
    args = ["plan", str(REPO / "configs" / "dpo-tiny.yaml"), f"--model.path={folder}", "--devices", "8", "--device-memory", "1GiB"]
    table = run_cli(*args, timeout=300)
    assert table.returncode == 0, table.stderr
    for name in ("single", "DDP x8", "FSDP/ZeRO-3 x8", "LoRA", "cached reference", "gradient checkpointing", "bf16 autocast"):
        assert name in table.stdout
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {r["strategy"]: r for r in result["strategies"]}
    assert result["params"] == sum(p.numel() for p in model.parameters())
    assert rows["FSDP/ZeRO-3 x8"]["bytes"]["optimizer"] < rows["single"]["bytes"]["optimizer"] / 7
    assert rows["LoRA"]["largest_batch"] >= rows["single"]["largest_batch"]
    assert main([*args[:2], f"--model.path={folder}", "--device-memory", "lots"]) != 0
    assert "--device-memory 'lots' is not a memory size" in capsys.readouterr().err


def test_a_hub_id_needs_only_its_config_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from preftune.errors import PreftuneError
    from preftune.training.memory import load_shape, shape_of

    sha = "b" * 40
    repo = tmp_path / "cache" / "models--org--big-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    (repo / "snapshots" / sha).mkdir(parents=True)
    model = llama("tiny")
    model.config.to_json_file(str(repo / "snapshots" / sha / "config.json"))  # no weights in the cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_shape("org/big-model") == shape_of(model.config)
    with pytest.raises(PreftuneError, match="no folder 'org/other' .*hf download org/other"):
        load_shape("org/other")
    with pytest.raises(PreftuneError, match="no folder .*; nor can it be a Hugging Face hub id"):
        load_shape(str(tmp_path / "missing" / "x"))


if __name__ == "__main__":  # under torchrun, by test_ddp_and_fsdp_estimates_per_process_within_25_percent: a JSON line per process and run
    # by hand: ... test_plan.py OUT 34m [rss]: the 34M model; rss: sharded only, no profiler (docs/scale.md's RSS)
    name, rss_only = (sys.argv[2] if len(sys.argv) > 2 else "tiny"), sys.argv[3:] == ["rss"]
    for sharding in ("fsdp",) if rss_only else ("fsdp", "none"):  # sharded first: getrusage's peak RSS is the highest so far
        result = measure(name, "dpo", "single", Path(sys.argv[1]), processes=int(os.environ["WORLD_SIZE"]), sharding=sharding,
                         profiled=not rss_only)
        print(json.dumps({"sharding": sharding, "rank": int(os.environ["RANK"]), "bytes": result}), flush=True)


def test_parameters_are_counted_exactly_for_another_architecture_on_the_meta_device() -> None:
    """A GPT-NeoX (Pythia) shape: the Llama formula alone counted 26.5% too many for Pythia-1b."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from preftune.training.memory import shape_of

    config = GPTNeoXConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
    shape = shape_of(config)
    assert shape.params() == sum(p.numel() for p in GPTNeoXForCausalLM(config).parameters())
    assert shape.counted is not None and shape.params() != replace(shape, counted=None).params()  # the formula alone is off


def test_a_bf16_runs_reference_copy_is_counted_with_its_layer_matrices_in_bf16() -> None:
    """Llama-2-7B's shapes, fp32 weights: under bf16 autocast the frozen copy holds its layers' matrices in bf16
    (training.reference.layer_matrices_to_bf16), so a full DPO step's fixed bytes are ~20 per parameter, not 22;
    FSDP gathers its layers in bf16."""
    from preftune.training.memory import Setup, Shape, estimate

    shape = Shape(vocab=32000, hidden=4096, layers=32, kv=4096, q=4096, mlp=11008, tied=False)
    total, matrices = shape.params(), 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    base = Setup("single", "dpo", 1, 128, 64, True, 1024, "float32", "adamw", reference="copy")
    fp32, bf16 = estimate(shape, base), estimate(shape, replace(base, bf16=True))
    assert fp32["reference"] == 4 * total and bf16["reference"] == 2 * matrices + 4 * (total - matrices)
    fixed = sum(bf16[key] for key in ("parameters", "gradients", "optimizer", "reference", "autocast_copies")) / total
    assert 20.0 < fixed < 20.1  # 4 + 4 + 8 + 2 (+ 4 for the 0.26B outside the layers' matrices) + 2
    sharded = estimate(shape, replace(base, bf16=True, sharding="fsdp", devices=8))
    assert sharded["gathered_layers"] == 2 * shape.layer_params() * 2 and sharded["reference"] == math.ceil(bf16["reference"] / 8)

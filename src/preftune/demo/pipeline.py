"""`preftune demo`: the whole pipeline on the embedded review task, through the users' code paths.

Stages (each a normal run folder under ``--out``):

1. ``base/``: a byte-level BPE tokenizer trained on the corpus and a tiny Llama (random weights).
2. ``sft/``: `preftune sft` on review openings -> continuations, so the model writes reviews of
   either sentiment.
3. ``pairs/``: two continuations sampled from the SFT model for each training prompt, labelled
   by the ground truth (chosen = the more positive; ties left out and counted).
4. ``rm/``: `preftune rm` on those pairs (a judge for evaluation; DPO does not use it).
5. ``dpo/`` (or ``dpo-beta-B/`` per swept beta): `preftune dpo` from the SFT model, which is
   also the reference. With ``--rounds 2``, ``dpo-round-2/``: a second round of iterative DPO on
   pairs sampled from the first round's policy (:func:`more_rounds`), shown beside the first.
6. ``eval/``: held-out prompts, policy vs reference: ground-truth reward, share of positive and
   of well-formed continuations, win rates judged by the ground truth and by the reward model,
   KL to the reference, preference accuracy on held-out pairs, perplexity on held-out reviews.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from preftune.demo import task


@dataclasses.dataclass
class DemoSettings:
    """Sizes and steps; ``quick()`` gives the reduced demo the tests run."""

    out: str = "runs/demo"
    seed: int = 0
    corpus: int = 6000
    vocab_size: int = 400
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    sft_steps: int = 300
    sft_batch: int = 32
    sft_lr: float = 3e-3
    pair_prompts: int = 2048
    samples_per_prompt: int = 8  # the best and the worst of them make the pair
    max_new_tokens: int = 40
    rm_steps: int = 150
    dpo_steps: int = 600
    dpo_batch: int = 32
    dpo_lr: float = 3e-3
    nll_alpha: float = 0.2  # an NLL term on chosen keeps the tiny model's text well-formed
    betas: tuple[float, ...] = (0.2,)
    rounds: int = 1  # 2: a second round of iterative DPO, sampled from the first round's policy (more_rounds)
    eval_prompts: int = 512
    eval_pairs: int = 256
    heldout_reviews: int = 300
    progress: bool = True

    def __post_init__(self) -> None:
        """Checked before anything runs: a bad beta would otherwise fail after a minute of training."""
        import math

        from preftune.errors import ConfigError

        bad = [b for b in self.betas if not (isinstance(b, (int, float)) and math.isfinite(b) and b > 0)]
        if not self.betas or bad:
            raise ConfigError(f"demo --beta must be a positive number, got {', '.join(map(repr, bad)) or 'none'}")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ConfigError(f"demo --out '{self.out}' is a file, not a folder.")

    @classmethod
    def quick(cls, out: str, **changes: Any) -> DemoSettings:
        """A reduced demo for CI: smaller corpus, fewer steps, fewer prompts."""
        base = dict(out=out, corpus=2000, sft_steps=150, pair_prompts=512, samples_per_prompt=4, rm_steps=40, dpo_steps=80, dpo_batch=16,
                    eval_prompts=128, eval_pairs=96, heldout_reviews=100, progress=False)
        base.update(changes)
        return cls(**base)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def build_base(s: DemoSettings, out: Path) -> Path:
    """Tokenizer + tiny Llama, saved with save_pretrained to ``out/base``."""
    from preftune.models.tiny import tiny_llama, train_tokenizer

    folder = out / "base"
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(task.corpus(s.corpus, s.seed), vocab_size=s.vocab_size, out_dir=folder)
    tiny_llama(tokenizer, hidden_size=s.hidden_size, num_layers=s.num_layers, num_heads=s.num_heads,
               max_position_embeddings=256, out_dir=folder)
    return folder


def sft_data(s: DemoSettings, out: Path) -> tuple[Path, Path]:
    """Prompt/completion files: training reviews, and held-out reviews (perplexity, eval loss)."""
    rng = random.Random(s.seed + 1)
    rows = [dict(zip(("prompt", "completion"), task.split_opening(text, rng))) for text in task.corpus(s.corpus, s.seed)]
    held = [dict(zip(("prompt", "completion"), task.split_opening(text, rng)))
            for text in task.corpus(s.heldout_reviews, s.seed + 100)]
    return _write_jsonl(out / "data" / "sft-train.jsonl", rows), _write_jsonl(out / "data" / "heldout.jsonl", held)


def run_stage(stage: str, config: Any) -> Path:
    """Run one training stage through the same entry point as the CLI (``preftune.stages.STAGE.run``)."""
    import importlib

    return importlib.import_module(f"preftune.stages.{stage}").run(config)


def _train_overrides(s: DemoSettings, out_dir: Path, steps: int, batch: int, lr: float) -> list[str]:
    return [f"--train.output_dir={out_dir}", f"--train.max_steps={steps}", f"--train.batch_size={batch}",
            f"--train.lr={lr}", f"--train.seed={s.seed}", "--train.scheduler=cosine", "--train.warmup_steps=5",
            f"--train.log_every={max(1, steps // 10)}", f"--train.eval_every={max(1, steps // 2)}",
            f"--train.progress={str(s.progress).lower()}", "--train.save_every=null", "--train.overwrite=true",
            "--train.bf16=false"]  # fp32 pinned: the same table on every processor (docs/demo.md)


def label_pairs(prompts: list[str], samples: list[list[str]]) -> tuple[list[dict], int]:
    """One preference pair per prompt from its samples, by the ground truth: the best sample is
    chosen, the worst rejected (the first of each on equal rewards), through :func:`preftune.stages.pairing.build_pairs`'s
    ``best_worst`` rule; prompts whose samples all score the same (or that have one) are ties, left out and counted."""
    from preftune.stages.pairing import build_pairs

    rewards = [[task.reward(prompt, text) for text in options] for prompt, options in zip(prompts, samples)]
    records, counts = build_pairs(prompts, samples, rewards, rule="best_worst")
    pairs = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in records]
    return pairs, counts.all_equal + counts.single


def sample(model_dir: Path, prompts: list[str], s: DemoSettings, *, num_samples: int, seed: int) -> list[list[str]]:
    """Temperature-1 samples (the SFT model's own distribution), batched."""
    from preftune.config.schema import ModelConfig
    from preftune.eval.generate import generate
    from preftune.models.load import load_causal_lm
    from preftune.models.tokenizer import load_tokenizer

    model = load_causal_lm(ModelConfig(path=str(model_dir))).eval()
    tokenizer = load_tokenizer(str(model_dir))
    return generate(model, tokenizer, prompts, max_new_tokens=s.max_new_tokens, temperature=1.0,
                    num_samples=num_samples, seed=seed, batch_size=128)


def more_rounds(s: Any, out: Path, sft_dir: Path, policies: dict[Any, Path], train_prompts: list[str], eval_prompts: list[str],
                timed: Callable[..., Any]) -> dict[Any, Path]:
    """Rounds 2..``s.rounds`` of iterative DPO after the demo's first (``--rounds``), keyed by
    (column label, beta) for the evaluation, round 1 included.

    Round k samples continuations from round k-1's policy (on-policy data), pairs the best
    against the worst of each prompt's samples by the ground truth (ties left out and counted,
    as in round 1), and trains DPO from round k-1's policy against the SFT model, which stays the
    reference (as `preftune iterate` does with ``iterate.reference: initial``). Round 1 is the
    demo's usual DPO run, untouched.
    """
    from preftune.config.schema import DPOConfig, load_config
    from preftune.errors import ConfigError

    if len(s.betas) != 1:
        raise ConfigError("--rounds takes one beta: the rounds are compared with each other, not across betas.")
    beta = s.betas[0]
    rounds = {("DPO round 1", beta): policies[beta]}
    previous = policies[beta]
    for number in range(2, s.rounds + 1):
        samples = timed(f"sample pairs (round {number})", sample, previous, train_prompts + eval_prompts, s,
                        num_samples=s.samples_per_prompt, seed=s.seed + number)
        train_pairs, _ = label_pairs(train_prompts, samples[: len(train_prompts)])
        eval_pairs, _ = label_pairs(eval_prompts, samples[len(train_prompts):])
        pairs_file = _write_jsonl(out / "pairs" / f"round-{number}-train.jsonl", train_pairs)
        eval_file = _write_jsonl(out / "pairs" / f"round-{number}-eval.jsonl", eval_pairs)
        cfg = load_config(DPOConfig, None, [f"--model.path={previous}", f"--reference.path={sft_dir}", f"--data.train={pairs_file}",
                                           f"--data.eval={eval_file}", "--reference.strategy=copy", f"--loss.beta={beta}",
                                           f"--loss.nll_alpha={s.nll_alpha}", "--data.max_length=96", "--data.max_prompt_length=32",
                                           *_train_overrides(s, out / f"dpo-round-{number}", s.dpo_steps, s.dpo_batch, s.dpo_lr)])
        previous = timed(f"dpo (round {number})", run_stage, "dpo", cfg) / "final"
        rounds[(f"DPO round {number}", beta)] = previous
    return rounds


def main_pipeline(s: DemoSettings) -> dict[str, Any]:
    """Run every stage; return the summary (also written to ``summary.json``)."""

    from preftune.config.schema import DPOConfig, RMConfig, SFTConfig, load_config
    from preftune.demo.evaluation import (
        evaluate_demo,
        frontier_plot,
        write_demo_report,
    )
    from preftune.system.hardware import default_device, processor_name

    start = time.time()
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def timed(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.time()
        result = fn(*args, **kwargs)
        timings[name] = round(time.time() - t0, 1)
        if s.progress:
            print(f"[demo] {name}: {timings[name]} s", flush=True)
        return result

    base = timed("base model", build_base, s, out)
    sft_train, heldout = sft_data(s, out)
    common_data = ["--data.max_length=96", "--data.max_prompt_length=32"]
    sft_cfg = load_config(SFTConfig, None, [f"--model.path={base}", f"--data.train={sft_train}", f"--data.eval={heldout}",
                                           *common_data, *_train_overrides(s, out / "sft", s.sft_steps, s.sft_batch, s.sft_lr)])
    sft_dir = timed("sft", run_stage, "sft", sft_cfg) / "final"

    train_prompts = task.prompts(s.pair_prompts, s.seed + 2)
    eval_prompts = task.prompts(s.eval_prompts, s.seed + 3)
    pair_prompts_eval = task.prompts(s.eval_pairs, s.seed + 4)
    samples = timed("sample pairs", sample, sft_dir, train_prompts + pair_prompts_eval, s,
                    num_samples=s.samples_per_prompt, seed=s.seed)
    train_pairs, ties = label_pairs(train_prompts, samples[: len(train_prompts)])
    eval_pairs, eval_ties = label_pairs(pair_prompts_eval, samples[len(train_prompts):])
    pairs_file = _write_jsonl(out / "pairs" / "train.jsonl", train_pairs)
    eval_pairs_file = _write_jsonl(out / "pairs" / "eval.jsonl", eval_pairs)

    rm_cfg = load_config(RMConfig, None, [f"--model.path={sft_dir}", f"--data.train={pairs_file}", f"--data.eval={eval_pairs_file}",
                                         *common_data, *_train_overrides(s, out / "rm", s.rm_steps, 16, 2e-3)])
    rm_dir = timed("reward model", run_stage, "rm", rm_cfg) / "final"

    policies: dict[float, Path] = {}
    for beta in s.betas:
        name = "dpo" if len(s.betas) == 1 else f"dpo-beta-{beta:g}"
        dpo_cfg = load_config(DPOConfig, None, [f"--model.path={sft_dir}", f"--data.train={pairs_file}",
                                               f"--data.eval={eval_pairs_file}", "--reference.strategy=copy",
                                               f"--loss.beta={beta}", f"--loss.nll_alpha={s.nll_alpha}", *common_data,
                                               *_train_overrides(s, out / name, s.dpo_steps, s.dpo_batch, s.dpo_lr)])
        policies[beta] = timed(f"dpo (beta {beta:g})", run_stage, "dpo", dpo_cfg) / "final"

    if s.rounds > 1:
        policies = more_rounds(s, out, sft_dir, policies, train_prompts, pair_prompts_eval, timed)
    results = timed("evaluation", evaluate_demo, s, out, sft_dir, policies, rm_dir, eval_prompts, eval_pairs_file, heldout)
    if len(s.betas) > 1:
        frontier_plot(results, out / "frontier.png")
    summary = {
        "wall_time_s": round(time.time() - start, 1),
        "stage_seconds": timings,
        "pairs": {"train": len(train_pairs), "train_ties_left_out": ties, "eval": len(eval_pairs), "eval_ties_left_out": eval_ties},
        "settings": dataclasses.asdict(s),
        "precision": "fp32 (pinned by the demo: the same table on every processor)",
        "processor": processor_name(default_device().type),
        **results,
    }
    summary["report"] = str(out / "report.html")
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    write_demo_report(out, summary)
    return summary

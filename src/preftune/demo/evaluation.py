"""The demo's evaluation: reference (the SFT model) against each aligned policy on held-out prompts.

Every number comes from the library's own evaluation code (:mod:`preftune.eval.metrics`,
:mod:`preftune.eval.judges`, :mod:`preftune.eval.generate`); the demo adds only the ground truth
(:mod:`preftune.demo.task`), which no training stage sees.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from preftune.demo import task


def _decode_all(tokenizer: Any, generated: Any) -> list[str]:
    from preftune.eval.generate import decode

    return [decode(tokenizer, samples[0], generated.stop_ids) for samples in generated.completion_ids]


def _sample(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, seed: int) -> tuple[Any, list[str]]:
    from preftune.eval.generate import GenerationSettings, generate_ids

    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=1.0, num_samples=1, seed=seed, batch_size=128)
    generated = generate_ids(model, tokenizer, prompts, settings)
    return generated, _decode_all(tokenizer, generated)


def _text_quality(prompts: list[str], generated: Any, texts: list[str]) -> dict[str, float]:
    n = len(texts)
    rewards = [task.reward(p, t) for p, t in zip(prompts, texts)]
    return {
        "ground_truth_reward": sum(rewards) / n,
        "positive_share": sum(task.sentiment(t) > 0 for t in texts) / n,
        "well_formed_share": sum(task.well_formed(p, t) and generated.finished(i, 0) for i, (p, t) in enumerate(zip(prompts, texts))) / n,
        "mean_words": sum(len(t.split()) for t in texts) / n,
    }


def ground_truth_judge(prompt: str, policy_response: str, reference_response: str) -> float:
    """1 when the policy's continuation has the higher ground-truth reward, 0 when lower, 0.5 on ties."""
    a, b = task.reward(prompt, policy_response), task.reward(prompt, reference_response)
    return 1.0 if a > b else 0.0 if a < b else 0.5


def evaluate_demo(s: Any, out: Path, reference_dir: Path, policies: dict[Any, Path], rm_dir: Path,
                  prompts: list[str], eval_pairs_file: Path, heldout_file: Path) -> dict[str, Any]:
    """The closing table's numbers for the reference and each policy; ``eval/eval.json`` too.

    ``policies`` maps a beta, or a (column label, beta) pair, to a policy folder."""
    from preftune.config.schema import ModelConfig
    from preftune.data import load_examples
    from preftune.data.tokenize import tokenize_pairs
    from preftune.eval.judges import reward_model_judge, win_rate
    from preftune.eval.metrics import kl_from_samples, perplexity, preference_metrics
    from preftune.models.load import load_causal_lm
    from preftune.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(reference_dir))
    reference = load_causal_lm(ModelConfig(path=str(reference_dir))).eval()
    heldout = [r["prompt"] + r["completion"] for r in map(json.loads, heldout_file.read_text().splitlines())]
    pairs_loaded = load_examples(eval_pairs_file)
    eval_pairs = tokenize_pairs(pairs_loaded.examples, tokenizer, max_length=96, max_prompt_length=32)
    ref_generated, ref_texts = _sample(reference, tokenizer, prompts, s.max_new_tokens, seed=s.seed + 10)
    rm_judge = reward_model_judge(rm_dir)

    results: dict[str, Any] = {"reference": {**_text_quality(prompts, ref_generated, ref_texts),
                                             "perplexity_heldout": perplexity(reference, tokenizer, heldout, batch_size=64)}}
    policies_out = []
    for key, policy_dir in policies.items():
        label, beta = key if isinstance(key, tuple) else (None, key)  # (column label, beta) for the rounds of --rounds
        policy = load_causal_lm(ModelConfig(path=str(policy_dir))).eval()
        generated, texts = _sample(policy, tokenizer, prompts, s.max_new_tokens, seed=s.seed + 20)
        kl = kl_from_samples(policy, reference, tokenizer, generated, batch_size=64)
        prefs = preference_metrics(policy, reference, tokenizer, eval_pairs, beta=beta, batch_size=64)
        gt = win_rate(prompts, texts, ref_texts, ground_truth_judge)
        rm = win_rate(prompts, texts, ref_texts, rm_judge)
        policies_out.append({
            **({"label": label} if label else {}),
            "beta": beta,
            "path": str(policy_dir),
            **_text_quality(prompts, generated, texts),
            "win_rate_ground_truth": {k: gt[k] for k in ("win_rate", "wins", "losses", "ties", "n", "ci95")},
            "win_rate_reward_model": {k: rm[k] for k in ("win_rate", "wins", "losses", "ties", "n", "ci95")},
            "kl_to_reference": {"mean": kl["mean"], "stderr": kl["stderr"], "n": kl["n"]},
            "preference_accuracy_heldout": prefs["rewards/accuracies"],
            "alignment_improved": prefs["alignment/improved"],
            "perplexity_heldout": perplexity(policy, tokenizer, heldout, batch_size=64),
            "samples": [{"prompt": p, "policy": t, "reference": r} for p, t, r in list(zip(prompts, texts, ref_texts))[:5]],
        })
    results["policies"] = policies_out
    results["reward_model_heldout_accuracy"] = _rm_accuracy(rm_dir, eval_pairs_file)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    (out / "eval" / "eval.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    return results


def _rm_accuracy(rm_dir: Path, pairs_file: Path) -> float:
    from preftune.stages.score import score_file

    _, summary = score_file(rm_dir, [str(pairs_file)], batch_size=64)
    return summary["accuracy"]


def closing_rows(summary: dict[str, Any]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The reference against each aligned policy: the column names, and one (metric, values) row per metric."""
    ref = summary["reference"]
    cols = [("reference (SFT)", None)] + [(p.get("label") or f"DPO beta={p['beta']:g}", p) for p in summary["policies"]]
    rows: list[tuple[str, list[str]]] = [
        ("ground-truth reward", [f"{ref['ground_truth_reward']:+.2f}"] + [f"{p['ground_truth_reward']:+.2f}" for _, p in cols[1:]]),
        ("positive continuations", [f"{ref['positive_share']:.1%}"] + [f"{p['positive_share']:.1%}" for _, p in cols[1:]]),
        ("well-formed, ended", [f"{ref['well_formed_share']:.1%}"] + [f"{p['well_formed_share']:.1%}" for _, p in cols[1:]]),
        ("mean words", [f"{ref['mean_words']:.1f}"] + [f"{p['mean_words']:.1f}" for _, p in cols[1:]]),
        ("win rate, ground truth", ["-"] + [_win(p["win_rate_ground_truth"]) for _, p in cols[1:]]),
        ("win rate, reward model", ["-"] + [_win(p["win_rate_reward_model"]) for _, p in cols[1:]]),
        ("KL to reference (nats)", ["0"] + [f"{p['kl_to_reference']['mean']:.2f} ± {p['kl_to_reference']['stderr']:.2f}" for _, p in cols[1:]]),
        ("pref. accuracy, held-out", ["-"] + [f"{p['preference_accuracy_heldout']:.1%}" for _, p in cols[1:]]),
        ("perplexity, held-out", [f"{ref['perplexity_heldout']:.3f}"] + [f"{p['perplexity_heldout']:.3f}" for _, p in cols[1:]]),
    ]
    return [name for name, _ in cols], rows


def closing_table(summary: dict[str, Any]) -> str:
    """The reference vs each aligned policy, one metric per line (the terminal's table)."""
    cols, rows = closing_rows(summary)
    width = max(len(name) for name, _ in rows)
    widths = [max(len(c), *(len(r[1][i]) for r in rows)) for i, c in enumerate(cols)]
    lines = [" " * width + "  " + "  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    for name, values in rows:
        lines.append(name.ljust(width) + "  " + "  ".join(v.rjust(w) for v, w in zip(values, widths)))
    lines.append(f"reward model accuracy on held-out pairs: {summary['reward_model_heldout_accuracy']:.1%}")
    return "\n".join(lines)


def _win(w: dict[str, Any]) -> str:
    from preftune.report.text import share_interval

    return share_interval(w["win_rate"], w["ci95"])


def frontier_plot(results: dict[str, Any], path: Path) -> Path:
    """Ground-truth reward against KL for each beta (the paper's figure 2, left)."""
    from preftune.report.plots import plot_frontier

    points = sorted((p["kl_to_reference"]["mean"], p["ground_truth_reward"], p["beta"]) for p in results["policies"])
    path.parent.mkdir(parents=True, exist_ok=True)
    return plot_frontier([(x, y, f"β={beta:g}") for x, y, beta in points], path, label="DPO",
                         baseline=(0.0, results["reference"]["ground_truth_reward"], "reference (SFT)"),
                         xlabel="KL(policy || reference), nats per continuation", ylabel="ground-truth reward",
                         title="reward against KL", width=5, height=3.5)


def header(summary: dict[str, Any]) -> tuple[str, list[tuple[str, str]]]:
    """What the demo ran, in sentences (model, data, precision, processor), and its stages with their times."""
    settings, pairs = summary.get("settings") or {}, summary["pairs"]
    text = (f"A tiny Llama (hidden size {settings.get('hidden_size', '?')}, {settings.get('num_layers', '?')} layers, "
            f"{settings.get('num_heads', '?')} heads, a {settings.get('vocab_size', '?')}-token byte-level BPE vocabulary), "
            f"fine-tuned on synthetic reviews, then aligned towards positive ones. Data: {pairs['train']} training pairs "
            f"({pairs['train_ties_left_out']} prompts left out as ties) and {pairs['eval']} held-out pairs "
            f"({pairs['eval_ties_left_out']} left out as ties). Precision: {summary.get('precision', 'not recorded')}. "
            f"Processor: {summary.get('processor', 'not recorded')}. Win rates with their 95% Wilson intervals in brackets; "
            "KL with its standard error.")
    stages = [(name, f"{seconds:.1f}") for name, seconds in summary["stage_seconds"].items()]
    return text, stages + [("whole demo", f"{summary['wall_time_s']:.1f}")]


def write_demo_report(out: Path, summary: dict[str, Any]) -> Path:
    """``out/report.html``: what ran (sentences and the stages' times), the closing table as an HTML
    table (built from the same numbers as the terminal's), the reward-KL frontier (with a sweep),
    sample continuations, and each stage's training curves, images embedded; readable without Python."""
    from preftune.report import html as report

    text, stages = header(summary)
    cols, rows = closing_rows(summary)
    parts = ["<h1>preftune demo: steering a tiny model towards positive reviews</h1>", f"<p>{report.escape(text)}</p>",
             report.table("Stages", stages, ("stage", "seconds")),
             "<h2>Reference (SFT) against the aligned policy</h2>",
             report.table(f"Held-out prompts; reward model accuracy on held-out pairs {summary['reward_model_heldout_accuracy']:.1%}",
                          [(name, *values) for name, values in rows], ("metric", *cols))]
    if (out / "frontier.png").is_file():
        parts += ["<h2>Reward against KL</h2>", report.image(out / "frontier.png", "reward against KL")]
    samples = [tuple(row[k] for k in ("prompt", "policy", "reference")) for row in summary["policies"][0]["samples"]]
    parts += ["<h2>Samples (held-out prompts)</h2>", report.table(None, samples, ("prompt", "policy", "reference"))]
    for stage in sorted(p for p in out.iterdir() if p.is_dir() and (p / "plots").is_dir()):
        pngs = sorted((stage / "plots").glob("*.png"))
        if pngs:
            parts.append(f"<h2>Training curves: {report.escape(stage.name)}</h2>")
            parts.append(report.images_row([report.image(png, f"{stage.name} {png.stem}") for png in pngs]))
    path = out / "report.html"
    path.write_text(report.page("preftune demo", "\n".join(parts)), encoding="utf-8")
    return path

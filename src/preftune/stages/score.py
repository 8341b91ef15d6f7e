"""`preftune score MODEL DATA`: rewards for prompt/response records, or for both sides of pairs.

Any format the data pipeline reads works. Prompt/response (or prompt/completion) records get a
``reward`` field; preference pairs get ``reward_chosen``, ``reward_rejected`` and ``margin``, and
the command prints the accuracy (chosen scored higher) and the mean margin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from preftune.data.records import PreferenceExample
from preftune.system.hardware import default_device


def score_file(model_dir: str | Path, data: list[str], *, fmt: str = "auto", batch_size: int = 16,
               on_error: str = "error", progress: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Scored records and a summary (records, and for pairs accuracy and mean margin)."""

    from preftune.data import load_examples
    from preftune.models.reward import load_reward_model

    device = default_device()
    model, tokenizer = load_reward_model(model_dir, device=device)
    result = load_examples(data, format=fmt, on_error=on_error)
    examples = result.examples
    summary: dict[str, Any] = {"records": result.report.records, "scored": len(examples), "dropped": result.report.dropped}
    if examples and isinstance(examples[0], PreferenceExample):
        prompts = [ex.prompt for ex in examples]
        systems = {ex.system for ex in examples}
        rewards = _score(model, tokenizer, prompts * 2, [ex.chosen for ex in examples] + [ex.rejected for ex in examples],
                         [ex.system for ex in examples] * 2, batch_size, systems, progress)
        n = len(examples)
        records = []
        for i, ex in enumerate(examples):
            chosen, rejected = rewards[i], rewards[n + i]
            records.append({"source": ex.source, "prompt": ex.prompt, "chosen": ex.chosen, "rejected": ex.rejected,
                            "reward_chosen": chosen, "reward_rejected": rejected, "margin": chosen - rejected})
        summary["accuracy"] = sum(r["margin"] > 0 for r in records) / max(1, n)
        summary["mean_margin"] = sum(r["margin"] for r in records) / max(1, n)
        return records, summary
    rewards = _score(model, tokenizer, [ex.prompt for ex in examples], [ex.completion for ex in examples],
                     [ex.system for ex in examples], batch_size, {ex.system for ex in examples}, progress)
    records = [{"source": ex.source, "prompt": ex.prompt, "completion": ex.completion, "reward": r}
               for ex, r in zip(examples, rewards)]
    summary["mean_reward"] = sum(rewards) / max(1, len(rewards))
    return records, summary


def _score(model: Any, tokenizer: Any, prompts: list, responses: list, systems: list, batch_size: int, distinct: set,
           progress: bool) -> list[float]:
    from preftune.models.reward import score_responses

    if len(distinct) <= 1:
        return score_responses(model, tokenizer, prompts, responses, batch_size=batch_size, system=next(iter(distinct), None),
                               progress=progress)
    # records with different system prompts: score each group, keep the order
    out: list[float] = [0.0] * len(prompts)
    for system in distinct:
        idx = [i for i, s in enumerate(systems) if s == system]
        scores = score_responses(model, tokenizer, [prompts[i] for i in idx], [responses[i] for i in idx],
                                 batch_size=batch_size, system=system, progress=progress)
        for i, value in zip(idx, scores):
            out[i] = value
    return out


def summary_line(summary: dict[str, Any]) -> str:
    """One line for the console: records scored, accuracy and margin (pairs) or mean reward."""
    parts = [f"scored {summary['scored']} of {summary['records']} records"]
    if "accuracy" in summary:
        parts.append(f"accuracy {summary['accuracy']:.4f}")
        parts.append(f"mean margin {summary['mean_margin']:.4f}")
    else:
        parts.append(f"mean reward {summary['mean_reward']:.4f}")
    if summary["dropped"]:
        parts.append("dropped " + ", ".join(f"{k}: {v}" for k, v in summary["dropped"].items()))
    return "; ".join(parts)

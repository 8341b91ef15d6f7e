"""What a report says about the run itself, read from its folder: which stage trained (``config.yaml``),
for how many steps and how long, on how much data (``data_report.json``), in which precision and on
which processor (``status.json``, written by :mod:`preftune.stages.lifecycle`). Plain text, escaped by the
page that shows it; every value written as words and numbers, never as a dict literal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from preftune.report.plots import is_number
from preftune.report.text import number as _f


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; empty when the file is missing or not an object (a report shows what there is)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def stage_name(config: dict[str, Any]) -> str:
    """What kind of run ``config.yaml`` describes, in words: ``DPO (loss dpo, beta 0.1)``, ``SFT``, ``KTO (beta 0.1)``, ``reward model``."""
    loss = config.get("loss") if isinstance(config.get("loss"), dict) else {}
    if "sft" in config:
        return "SFT"
    if "kto" in config:
        return f"KTO (beta {_f(loss.get('beta'))})"
    if "lm_weight" in loss:
        return "reward model"
    if "name" in loss:
        return f"preference tuning (loss {loss['name']}, beta {_f(loss.get('beta'))})"
    return "training"


def precision_text(status: dict[str, Any]) -> str:
    """``fp32 (CPU without bf16 units)`` from ``status.json``'s record, or ``not recorded``."""
    record = status.get("precision")
    if not isinstance(record, dict):
        return "not recorded"
    return f"{'bf16 autocast' if record.get('bf16') else 'fp32'} ({record.get('why', 'no reason recorded')})"


def data_counts(report: dict[str, Any]) -> str:
    """``64 training pairs (of 64 records), 32 held-out`` from ``data_report.json``."""
    parts = []
    for split, what in (("train", "training examples"), ("eval", "held-out examples")):
        r = report.get(split)
        if isinstance(r, dict) and r.get("kept") is not None:
            parts.append(f"{r['kept']} {what} (of {r.get('records', '?')} records)")
    return ", ".join(parts) or "not recorded"


def run_sentences(config: dict[str, Any], metrics: list[dict[str, Any]], data_report: dict[str, Any], status: dict[str, Any]) -> str:
    """The run in sentences (plain text): what trained, from which model, how long, on how much data, in which precision,
    on which processor."""
    model = (config.get("model") or {}).get("path") if isinstance(config.get("model"), dict) else None
    steps = [m["step"] for m in metrics if is_number(m.get("step"))]
    took = f", which took {_f(status['seconds'])} s" if is_number(status.get("seconds")) else ""
    done = f"{max(steps)} optimizer steps{took}" if steps else "no optimizer step logged yet"
    return (f"{stage_name(config)[0].upper() + stage_name(config)[1:]} of {model or 'an unrecorded model'}: {done}. "
            f"Data: {data_counts(data_report)}. Precision: {precision_text(status)}. Processor: {status.get('processor') or 'not recorded'}.")

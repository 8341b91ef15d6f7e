"""`preftune dpo CONFIG --sweep loss.beta=0.05,0.1,0.2`: one policy per value, one reference pass.

Every value (every combination, when several settings are swept) is a DPO run of its own in
``train.output_dir/KEY-VALUE`` (made a safe folder name: no separator, no ``..``, unique), trained by :mod:`preftune.stages.dpo` as any run is. The
reference is paid for once: a run that would read a frozen copy of the reference model
(``reference.strategy`` ``auto`` or ``copy``, without LoRA) uses the on-disk cache instead
(:mod:`preftune.training.reference`), whose key covers the reference weights, the tokenized data, the
tokenizer and the precision, none of which a sweep over the loss changes. So the first run
computes the reference log-probs and the others read them. Runs with a reference-free loss
(SimPO, ORPO) need none; with LoRA the reference is the adapter switched off, at no extra cost.

When held-out data exists, each run is evaluated (:func:`preftune.eval.run.run_eval`: held-out
preference metrics, KL from samples). With a judge (``sweep.judge``, a function, or
``sweep.reward_model``, as `preftune eval` takes them), each policy's samples are judged once
against the reference's, on the held-out prompts, with the win rate's interval. The report
(:mod:`preftune.report.sweep`) plots against KL the judge's score when there is one, else the
beta-free log-ratio margin and the held-out accuracy: never the implicit reward margin, which
is beta times the log-ratio margin and so grows with beta by construction. ``sweep.json``
records the runs, whether each read the reference from the cache, how many reference passes
were computed, and the judge.

An interrupted sweep continues with ``train.resume_from=latest``: finished runs are kept, a run
with a checkpoint resumes from it (exactly), and the others start.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import sys
from pathlib import Path
from typing import Any

from preftune.config.schema import DPOConfig, build_config, parse_overrides, to_dict
from preftune.config.trl_names import trl_hint
from preftune.config.typed import merge_nested
from preftune.errors import ConfigError
from preftune.losses import needs_reference
from preftune.system.runfolder import read_status
from preftune.training.checkpoint import latest_checkpoint


@dataclasses.dataclass
class Variant:
    """One run of a sweep: its label (``beta=0.05``), folder name and config."""

    label: str
    folder: str
    cfg: DPOConfig


def parse_sweeps(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["loss.beta=0.05,0.1"]`` -> ``[("loss.beta", ["0.05", "0.1"])]``, each key once, each with a value."""
    found: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().removeprefix("--")
        parts = [v.strip() for v in values.split(",")]
        if not sep or not key or not all(parts):
            raise ConfigError(f"--sweep '{item}': expected KEY=VALUE1,VALUE2,... such as loss.beta=0.05,0.1,0.2")
        if any(key == k for k, _ in found):
            raise ConfigError(f"--sweep: '{key}' is swept twice; give its values once, comma-separated")
        if len(set(parts)) != len(parts):
            raise ConfigError(f"--sweep '{item}': a value is repeated")
        if key.split(".")[0] == "train" and key.split(".")[-1] in ("output_dir", "resume_from", "overwrite"):
            raise ConfigError(f"--sweep: '{key}' cannot be swept; each run's folder is made from the swept values")
        found.append((key, parts))
    return found


def variants(cfg: DPOConfig, sweeps: list[tuple[str, list[str]]]) -> list[Variant]:
    """Every combination of the swept values, as checked configs whose reference is cached when it would be a copy."""
    base = to_dict(cfg)
    out = []
    for combo in itertools.product(*(values for _, values in sweeps)):
        pairs = list(zip((key for key, _ in sweeps), combo))
        label = ", ".join(f"{key.split('.')[-1]}={value}" for key, value in pairs)
        folder = _unique(safe_name("-".join(f"{key.split('.')[-1]}-{value}" for key, value in pairs)), {v.folder for v in out})
        overrides = [f"--{key}={value}" for key, value in pairs]
        data = merge_nested(json.loads(json.dumps(base)), parse_overrides(overrides, DPOConfig, hint=trl_hint))
        data["train"]["output_dir"] = str(Path(cfg.train.output_dir) / folder)
        try:
            variant = build_config(DPOConfig, data)
        except ConfigError as err:
            raise ConfigError(f"--sweep {label}: {err}") from None
        if (variant.reference.strategy in ("auto", "copy") and needs_reference(variant.loss.name)
                and not variant.model.lora.enabled and not variant.reference.sync_ref_model):  # a synced reference moves: no cache
            variant.reference.strategy = "cache"  # paid once, read by the other runs
        out.append(Variant(label, folder, variant))
    return out


def safe_name(text: str) -> str:
    """``text`` as one folder name: no separator, no leading dot (so never ``.`` or ``..``), nothing
    but letters, digits and ``._=+-`` (others become ``_``)."""
    name = re.sub(r"[^A-Za-z0-9._=+-]", "_", text)
    return "_" + name[1:] if name.startswith(".") else name or "_"


def _unique(name: str, taken: set[str]) -> str:
    """``name``, or ``name-2``, ``name-3``... when two values became the same name."""
    number, found = 1, name
    while found in taken:
        number += 1
        found = f"{name}-{number}"
    return found


def continued(variant: DPOConfig, folder: Path) -> DPOConfig | None:
    """A sweep resumed (``train.resume_from=latest``): None for a run that finished (at ``train.max_steps``
    when set), the run resumed from its latest intact checkpoint, or started again when it saved none."""
    status = read_status(folder)
    if status.get("status") == "finished" and (folder / "final").is_dir() and (variant.train.max_steps is None
                                                                               or (status.get("step") or 0) >= variant.train.max_steps):
        return None
    started = latest_checkpoint(folder, say=lambda line: None) is not None
    return dataclasses.replace(variant, train=dataclasses.replace(variant.train, resume_from="latest" if started else None,
                                                                 overwrite=not started))


def check_judge(cfg: DPOConfig, judge: Any = None) -> str | None:
    """The sweep's judge checked before any training (its function imported, its reward model folder
    found, held-out prompts to judge on); returns its name for ``sweep.json`` (None without one)."""
    from preftune.errors import PreftuneError
    from preftune.eval.judges import as_judge, function_judge

    given = [name for name, value in (("sweep.judge", judge or cfg.sweep.judge), ("sweep.reward_model", cfg.sweep.reward_model)) if value]
    if not given:
        return None
    if not (cfg.data.eval or cfg.data.eval_fraction > 0):
        raise ConfigError(f"{' and '.join(given)}: a sweep judges samples on the held-out prompts; give data.eval or data.eval_fraction")
    if cfg.sweep.reward_model and not Path(cfg.sweep.reward_model).is_dir():
        raise PreftuneError(f"sweep.reward_model '{cfg.sweep.reward_model}' is not a folder (give `preftune rm`'s final/ folder).")
    names = [as_judge(judge).name if judge is not None else function_judge(cfg.sweep.judge).name] if (judge or cfg.sweep.judge) else []
    return ", ".join(names + ([f"reward model {cfg.sweep.reward_model}"] if cfg.sweep.reward_model else []))


def run_sweep(cfg: DPOConfig, items: list[str], judge: Any = None) -> Path:
    """Train (and, with held-out data, evaluate) every value; write ``sweep.json`` and the report.
    ``judge`` is a function given in Python in place of ``sweep.judge`` (whose value then names it)."""
    from preftune.eval.run import EvalSettings, run_eval
    from preftune.report.sweep import write_sweep_report
    from preftune.stages import dpo

    sweeps = parse_sweeps(items)
    runs = variants(cfg, sweeps)
    judged_by = check_judge(cfg, judge)
    root = Path(cfg.train.output_dir)
    held_out = bool(cfg.data.eval) or cfg.data.eval_fraction > 0
    records: list[dict[str, Any]] = []
    for number, variant in enumerate(runs, start=1):
        print(f"preftune: sweep {number}/{len(runs)}: {variant.label} -> {root / variant.folder}", file=sys.stderr, flush=True)
        run_cfg = continued(variant.cfg, root / variant.folder) if cfg.train.resume_from else variant.cfg
        if run_cfg is None:
            print(f"preftune: sweep {number}/{len(runs)}: finished before, kept", file=sys.stderr, flush=True)
        folder = dpo.run(run_cfg) if run_cfg is not None else root / variant.folder
        info = json.loads((folder / "reference.json").read_text(encoding="utf-8"))
        warm = (info.get("train_cache") or {}).get("warm")
        if held_out and (run_cfg is not None or not any(folder.glob("eval*.json"))):
            run_eval(EvalSettings(policy=str(folder), judge=None if judge is not None else cfg.sweep.judge,
                                  reward_model=cfg.sweep.reward_model), judge=judge)
        records.append({"label": variant.label, "folder": variant.folder, "reference": info.get("strategy"), "reference_warm": warm})
        passes = sum(1 for r in records if r["reference_warm"] is False)
        (root / "sweep.json").write_text(json.dumps({"swept": [f"{k}={','.join(v)}" for k, v in sweeps], "runs": records,
                                                     "reference_passes": passes, "judge": judged_by}, indent=1), encoding="utf-8")
    if cfg.train.report:
        print(f"preftune: sweep report {write_sweep_report(root)}", file=sys.stderr)
    return root

"""`preftune iterate`: on-policy rounds of DPO. Each round samples K completions per prompt from
the current policy, scores them with a judge, pairs them (:mod:`preftune.stages.pairing`), trains
DPO from the current policy through :mod:`preftune.stages.dpo` (the one loop), and measures the
new policy on held-out prompts (:mod:`preftune.eval.iteration`).

On disk, under ``train.output_dir``::

    config.yaml      the resolved iterate config
    initial.json     the initial model's held-out samples and judge score (drawn once)
    round-N/         a DPO run folder, plus samples.jsonl (scored), pairs.jsonl, round.json
    iterate.json     every finished round's metrics, side by side; report.html draws them

A stopped loop continues with ``train.resume_from=latest``: finished rounds (``round.json``)
are kept, a round's saved samples and pairs are reused, and its DPO run resumes from its own
latest checkpoint (``train.save_every``) or, with none, starts that round's training again.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from preftune.config.schema import to_dict, to_yaml
from preftune.errors import ConfigError, PreftuneError
from preftune.eval.generate import write_generations
from preftune.eval.iteration import evaluate_round, initial_samples, sample_and_score, score_summary
from preftune.eval.prompts import read_prompts
from preftune.eval.scoring import function_fingerprint, function_name, function_scorer, load_scorer
from preftune.models.runs import describe_model, load_model
from preftune.stages import dpo
from preftune.stages.iterate_config import IterateConfig, check, round_config
from preftune.stages.lifecycle import open_run
from preftune.stages.pairing import build_pairs
from preftune.system.distributed import world
from preftune.system.files import atomic_write
from preftune.system.hardware import default_device
from preftune.system.runfolder import read_status
from preftune.training.checkpoint import latest_checkpoint

FILES = ("config.yaml", "initial.json", "iterate.json", "report.html", "plots", "judge.json")
JUDGE_FILE = "judge.json"  # a judge function's name and fingerprint (eval.scoring.function_fingerprint)


def run(cfg: IterateConfig, *, callbacks: Sequence[Any] = (), judge: Any = None) -> Path:
    """Run (or continue) the iteration; return its folder. ``callbacks`` go to every round's training
    loop; ``judge``, a function ``(prompt, completion) -> number``, scores in place of
    ``iterate.judge`` (which then records its name, ``module:qualname``)."""
    cfg, scorer, judge_id = _given_judge(cfg, judge)
    check(cfg)
    if world()[1] > 1:
        raise PreftuneError("`preftune iterate` runs in one process (sampling, scoring and pairing are not sharded yet); "
                            "it was launched in several.")
    loop = _begin(cfg, scorer, judge_id)
    rounds: list[dict[str, Any]] = []
    policy_path = cfg.model.path
    for number in range(1, cfg.iterate.rounds + 1):
        folder = loop.out / f"round-{number}"
        if (folder / "round.json").is_file():  # finished before: kept, not redone
            rounds.append(json.loads((folder / "round.json").read_text(encoding="utf-8")))
        else:
            _say(f"round {number}/{cfg.iterate.rounds}: policy {policy_path}")
            rounds.append(_round(loop, number, folder, policy_path, callbacks))
            _write_summary(loop.out, cfg, loop.initial, rounds)
        policy_path = str(folder / "final")
    _write_summary(loop.out, cfg, loop.initial, rounds)
    if cfg.train.report:
        from preftune.report.series import write_iteration_report

        _say(f"report {write_iteration_report(loop.out)}")
    return loop.out


@dataclasses.dataclass
class _Iteration:
    """What every round of one iteration shares: its settings and folder, the judge, the prompts and the initial model's samples."""

    cfg: IterateConfig
    out: Path
    device: torch.device
    judge: Any
    train_prompts: list[Any]
    eval_prompts: list[Any]
    initial: dict[str, Any] = dataclasses.field(default_factory=dict)

    def load(self, path: str) -> tuple[Any, Any]:
        """A model and its tokenizer, held only while used: training a round needs the memory."""
        return load_model(describe_model(path), device=self.device, trust_remote_code=self.cfg.model.trust_remote_code)

    def eval_kwargs(self) -> dict[str, Any]:
        gen = self.cfg.generate
        return dict(max_new_tokens=gen.max_new_tokens, samples=self.cfg.iterate.eval_samples, seed=gen.seed, batch_size=gen.batch_size)


def _given_judge(cfg: IterateConfig, judge: Any) -> tuple[IterateConfig, Any, dict[str, Any] | None]:
    """A judge function given in Python: ``cfg`` naming it, its scorer (its signature checked before anything is
    written) and its identity (name and fingerprint); ``cfg``, None, None without one."""
    if judge is None:
        return cfg, None, None
    if not callable(judge):
        raise ConfigError(f"judge must be a function (prompt, completion) -> number, got {type(judge).__name__}.")
    if cfg.iterate.reward_model or cfg.iterate.judge not in (None, function_name(judge)):
        raise ConfigError(f"a judge function was given, and the config names another judge "
                          f"({cfg.iterate.reward_model or cfg.iterate.judge}); give exactly one.")
    cfg = dataclasses.replace(cfg, iterate=dataclasses.replace(cfg.iterate, judge=function_name(judge)))
    return cfg, function_scorer(judge), {"name": function_name(judge), "fingerprint": function_fingerprint(judge)}


def _begin(cfg: IterateConfig, scorer: Any, judge_id: dict[str, Any] | None) -> _Iteration:
    """Load the judge, claim the folder, read the prompts, and draw (or read back) the initial model's held-out samples."""
    out = Path(cfg.train.output_dir)
    device = default_device()
    it, gen = cfg.iterate, cfg.generate
    # the judge is loaded before anything is written: a typo in its name leaves nothing that refuses the corrected command
    judge = scorer or load_scorer(it.judge, it.reward_model, batch_size=gen.batch_size, device=device)
    describe_model(cfg.model.path)  # so are the model and the prompts: a missing one is named, and nothing written
    train_prompts = _prompts(read_prompts, it.prompts, it.max_prompts)
    eval_prompts = _prompts(read_prompts, it.eval_prompts, it.max_eval_prompts)
    _claim(out, cfg, judge_id)
    loop = _Iteration(cfg, out, device, judge, train_prompts, eval_prompts)
    initial_file = out / "initial.json"
    if initial_file.is_file():
        loop.initial = json.loads(initial_file.read_text(encoding="utf-8"))
    else:
        initial_model, tokenizer = loop.load(cfg.model.path)
        loop.initial = initial_samples(initial_model, tokenizer, *_split(loop.eval_prompts), judge, **loop.eval_kwargs())
        del initial_model
        _write_json(initial_file, loop.initial)
    return loop


def _round(loop: _Iteration, number: int, folder: Path, policy_path: str, callbacks: Sequence[Any]) -> dict[str, Any]:
    """One round: sample, score and pair (or reuse the saved pairs), train DPO from ``policy_path``
    (or resume its run), measure the new policy; its summary, also written to ``round.json``."""
    cfg, it = loop.cfg, loop.cfg.iterate
    folder.mkdir(parents=True, exist_ok=True)
    pairs_file = folder / "pairs.jsonl"
    if not pairs_file.is_file():
        _make_pairs(loop, number, folder, policy_path)
    pairing = json.loads((folder / "pairing.json").read_text(encoding="utf-8"))
    _say(f"round {number}: {pairing['pairs']} pairs from {pairing['prompts']} prompts (ties dropped: {pairing['ties']}, "
         f"below the gap: {pairing['below_gap']}, all-equal prompts: {pairing['all_equal']})")
    reference = (cfg.reference.path or cfg.model.path) if it.reference == "initial" else policy_path
    round_cfg = round_config(cfg, policy=policy_path, reference=reference, pairs=pairs_file, output_dir=folder)
    _train_round(round_cfg, number, folder, callbacks)
    policy_path = str(folder / "final")
    (policy, tokenizer), (initial_model, _) = loop.load(policy_path), loop.load(cfg.model.path)
    result = evaluate_round(policy, initial_model, tokenizer, *_split(loop.eval_prompts), loop.judge, loop.initial, **loop.eval_kwargs())
    del policy, initial_model
    summary = {"round": number, "policy": policy_path, "reference": reference, "pairing": pairing,
               "steps": read_status(folder).get("step"), **result}
    _write_json(folder / "round.json", summary)
    _say(f"round {number}: held-out judge score {result['judge_score']['mean']:.4f} (initial "
         f"{loop.initial['judge_score']['mean']:.4f}), win rate vs initial {result['win_rate_vs_initial']['win_rate']:.3f}, "
         f"KL to initial {result['kl_to_initial']['mean']:.3f}")
    return summary


def _make_pairs(loop: _Iteration, number: int, folder: Path, policy_path: str) -> None:
    """Sample from the policy, score with the judge, pair (:mod:`preftune.stages.pairing`): samples.jsonl,
    pairing.json and, last, pairs.jsonl (whose presence marks the round's data as complete)."""
    it, prompts = loop.cfg.iterate, loop.train_prompts
    policy, policy_tokenizer = loop.load(policy_path)
    settings = _round_settings(loop.cfg.generate, number)
    _, texts, scores = sample_and_score(policy, policy_tokenizer, *_split(prompts), loop.judge, settings)
    del policy
    samples = [{"prompt": p.prompt, "system": p.system, "sample": j, "completion": t, "score": s, "round": number}
               for p, group, values in zip(prompts, texts, scores) for j, (t, s) in enumerate(zip(group, values))]
    atomic_write(folder / "samples.jsonl", lambda tmp, rows=samples: write_generations(tmp, rows))
    pairs, counts = build_pairs([p.prompt for p in prompts], texts, scores, rule=it.pairing, min_gap=it.min_gap,
                                systems=[p.system for p in prompts])
    _write_json(folder / "pairing.json", {"rule": it.pairing, "min_gap": it.min_gap, **counts.as_dict(),
                                          "sample_score": score_summary(scores)})
    if not pairs:
        raise PreftuneError(f"round {number}: no pairs: every prompt's samples scored the same or within "
                            f"iterate.min_gap ({folder / 'pairing.json'}); more samples (generate.num_samples), a "
                            "higher generate.temperature or a finer-grained judge would help.")
    atomic_write(folder / "pairs.jsonl", lambda tmp, rows=pairs: write_generations(tmp, rows))


def _train_round(round_cfg: Any, number: int, folder: Path, callbacks: Sequence[Any]) -> None:
    """The round's DPO run, unless it finished: resumed from its latest checkpoint, or started again without one."""
    status = read_status(folder)
    if status.get("status") == "finished" and (folder / "final").is_dir():
        return
    latest = latest_checkpoint(folder)
    if latest is not None:
        round_cfg.train.resume_from = "latest"
        _say(f"round {number}: resuming its DPO run from {latest}")
    else:
        round_cfg.train.overwrite = True  # a round that saved no checkpoint starts its training again
    with open_run(round_cfg) as run:
        run.train(dpo.build_task(round_cfg, run), callbacks)


# --------------------------------------------------------------------------- pieces
def _claim(out: Path, cfg: IterateConfig, judge_id: dict[str, Any] | None) -> None:
    """Make ``out`` this iteration's: continue it (``resume_from=latest``, same settings, the same judge
    function), replace it (``overwrite``), or refuse to touch an iteration already there."""
    saved = out / "config.yaml"
    held = [p.name for p in sorted(out.glob("round-*"))] + [name for name in FILES if (out / name).exists()]
    if held and not cfg.train.resume_from:
        if not cfg.train.overwrite:
            raise PreftuneError(f"'{out}' already holds an iteration ({', '.join(held)}); continue it with "
                                "train.resume_from=latest, replace it with train.overwrite=true, or choose another train.output_dir.")
        links = [out / name for name in held if (out / name).is_symlink()]
        if links:  # every entry checked before any is deleted
            raise PreftuneError(f"'{links[0]}' is a symbolic link, which no preftune iteration writes: nothing was replaced; "
                                "remove the link, or choose another train.output_dir.")
        for name in held:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if cfg.train.resume_from and saved.is_file():
        from preftune.config.yamlfile import read_yaml

        before, now = _comparable(read_yaml(saved, "the iteration's config.yaml")), _comparable(to_dict(cfg))
        changed = sorted(f"{s}.{k}" for s in now for k in now[s] if (before.get(s) or {}).get(k) != now[s][k])
        if changed:
            raise ConfigError(f"train.resume_from=latest continues the iteration in '{out}' with the settings it began with; "
                              f"changed: {', '.join(changed)} (only iterate.rounds may grow).")
        _check_judge(out, judge_id)
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(to_yaml(cfg), encoding="utf-8")
    if judge_id is not None:
        _write_json(out / JUDGE_FILE, judge_id)


def _check_judge(out: Path, judge_id: dict[str, Any] | None) -> None:
    """A judge function given on resume must be the one the iteration began with: its name is not
    enough (two closures of one factory, or two lambdas, share it), so its code and closure values are compared."""
    if judge_id is None:
        return
    try:
        before = json.loads((out / JUDGE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        before = {}
    if before.get("fingerprint") != judge_id["fingerprint"]:
        raise ConfigError(f"train.resume_from=latest continues the iteration in '{out}' with its own judge; the judge function "
                          f"{judge_id['name']} has the same name but other code, defaults or closure values. Give the same function, or start "
                          "a new iteration in another train.output_dir.")


def _comparable(data: dict[str, Any]) -> dict[str, Any]:
    data = json.loads(json.dumps(data))
    for section, key in (("train", "resume_from"), ("train", "overwrite"), ("train", "output_dir"), ("iterate", "rounds"), ("generate", "progress"),
                         ("train", "progress")):
        (data.get(section) or {}).pop(key, None)
    return data


def _prompts(read: Any, files: list[str], limit: int | None) -> list[Any]:
    records = [r for path in files for r in read(path)]
    if not records:
        raise PreftuneError(f"no prompts in {', '.join(files)}.")
    return records[:limit] if limit is not None else records


def _split(records: list[Any]) -> tuple[list[Any], list[str | None]]:
    return [r.prompt for r in records], [r.system for r in records]


def _round_settings(gen: Any, number: int) -> Any:
    return dataclasses.replace(gen, seed=gen.seed + number - 1)  # fresh samples each round, the same on a rerun


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8"))


def _write_summary(out: Path, cfg: IterateConfig, initial: dict[str, Any], rounds: list[dict[str, Any]]) -> None:
    _write_json(out / "iterate.json", {"rounds_planned": cfg.iterate.rounds, "judge": initial["judge"],
                                       "initial": {"judge_score": initial["judge_score"], "path": cfg.model.path},
                                       "rounds": [{k: v for k, v in r.items() if k != "samples"} for r in rounds],
                                       "samples": rounds[-1]["samples"] if rounds else []})


def _say(message: str) -> None:
    print(f"preftune: iterate: {message}", file=sys.stderr, flush=True)

"""What every training stage does around its own objective: start a run folder, record the
data, save the final model, train, write the report, and say in ``status.json`` how it ended
(``running`` from the start, with the processor and the start time, then ``finished`` with the
seconds since this process started it, or ``failed`` with the error; a run killed outright stays
``running``).

The console of a run is two lines of its own on stderr, said by the main process only: at the
start, one line naming the model (its parameters), the data (kept and dropped, by split), the
reference strategy, the processes, and the precision and compile choices with their reasons
(:func:`start_line`; ``status.json`` keeps both choices too); at the end, the ``done`` line.
Between them run preftune's own progress bars (``train.progress``); transformers' per-file
loading and saving bars are quiet for the whole run (:func:`preftune.system.progress.quiet_transformers_bars`).

A run is one value, opened once: ``with open_run(cfg, given) as run:`` checks the config, claims the
folder, writes ``config.yaml`` and starts the plan (the resume point verified, processes, global
batch, data digests); the stage's ``build_task(cfg, run)`` records the data, builds its model and
calls :meth:`Run.decide` right after (precision and compile: the plan is complete), and returns the
loop's :class:`~preftune.training.task.Task`; ``run.train(task)`` trains it. A stage's ``run(cfg)``
reads ``with open_run(cfg) as run: run.train(build_task(cfg, run))``. So the CLI, the Python API,
the demo and the benchmarks build a stage the same way, and a caller that needs the pieces (a
benchmark that times the loop) takes the task and calls :meth:`Run.fit`, the loop alone.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preftune.config.schema import to_dict, to_yaml, validate
from preftune.data.cache import source_digests
from preftune.errors import PreftuneError
from preftune.models.load import check_causal_lm, save_policy
from preftune.models.tokenizer import load_tokenizer
from preftune.system import distributed
from preftune.system.hardware import default_device, processor_name
from preftune.system.progress import quiet_transformers_bars
from preftune.system.runfolder import STATUS_FILE, Claim, check_folder, claim_folder, process_start, read_status
from preftune.system.seeding import seed_everything
from preftune.training.compile_choice import CompileChoice
from preftune.training.loop import Fitted, fit
from preftune.training.precision import PrecisionChoice, model_params
from preftune.training.runplan import RunPlan, RunStart, plan_start
from preftune.training.sharding import check_supported
from preftune.training.task import Task


@dataclass
class Given:
    """What a Python caller passes besides the config; None means: load it as the config says.

    ``model`` (a transformers ``PreTrainedModel`` or peft ``PeftModel``) is trained in place;
    ``ref_model`` is frozen and used as the reference; ``train_data`` / ``eval_data`` are a
    ``datasets.Dataset``, a list of dicts or a path.
    """

    model: nn.Module | None = None
    tokenizer: Any = None
    ref_model: nn.Module | None = None
    train_data: Any = None
    eval_data: Any = None

    def sources(self) -> dict[str, Any]:
        return {"train": self.train_data, "eval": self.eval_data}


@dataclass
class Run:
    """An open run (:func:`open_run`): its config, folder, tokenizer and device, what the caller gave,
    its folder claim, and its plan: started when it opened (:attr:`start`), complete once the stage has
    built the model (:meth:`decide`). ``about``: what its start line says of the data and the reference
    (the stage adds them as it builds the task)."""

    cfg: Any
    dir: Path
    tokenizer: Any
    device: torch.device
    given: Given
    start: RunStart
    claim: Claim | None = None  # the main process's hold on the folder; None on the others
    about: list[str] = field(default_factory=list)
    _plan: RunPlan | None = None
    _training: bool = False

    def decide(self, model: nn.Module, items: int) -> RunPlan:
        """The run's precision and compile choice for ``model`` trained on ``items`` items, decided once,
        right after the stage built the model (before a reference copy or cache pass runs as it will)."""
        if self._plan is not None:
            raise RuntimeError("a run's precision and compile choice are decided once")  # a stage's mistake, not the user's
        self._plan = self.start.decide(self.cfg.train, model, items, self.device)
        return self._plan

    @property
    def plan(self) -> RunPlan:
        """The complete plan (:meth:`decide` has run)."""
        if self._plan is None:
            raise RuntimeError("the stage built its task without deciding the run's plan (Run.decide)")
        return self._plan

    def fit(self, task: Task, callbacks: Sequence[Any] = ()) -> Fitted:
        """The loop alone on ``task``, as the plan says: from here a failure is recorded in ``status.json``."""
        if self.claim is not None and not self._training:
            self.claim.commit()
        self._training = True
        return fit(task, self.plan, self.cfg.train, self.dir, callbacks, hparams=to_dict(with_precision(self.cfg, self.plan.precision)))

    def train(self, task: Task, callbacks: Sequence[Any] = ()) -> Fitted:
        """Train ``task``: the choices recorded, the start line, the loop, ``status.json`` finished, the
        report when asked, the done line."""
        cfg, plan, run_dir = self.cfg, self.plan, self.dir
        if distributed.is_main():
            record_choices(run_dir, cfg, plan.precision, plan.compile)
            print(start_line(self, task), file=sys.stderr, flush=True)
        fitted = self.fit(task, callbacks)
        if distributed.is_main():
            started = read_status(run_dir).get("started")
            took = round(time.time() - started, 1) if isinstance(started, (int, float)) else None  # since this process started the run
            mark(run_dir, "finished", step=fitted.state.step, stopped_by=fitted.stopped_by, seconds=took)
            if cfg.train.report:
                write_report_or_warn(run_dir)
            stopped = f" (stopped at step {fitted.state.step} by {fitted.stopped_by})" if fitted.stopped_by else ""
            print(f"preftune: done{stopped}: model in {run_dir / 'final'}, metrics in {run_dir / 'metrics.jsonl'}"
                  + (f", report {run_dir / 'report.html'}" if (run_dir / "report.html").is_file() else ""), file=sys.stderr)
        return fitted


@contextmanager
def open_run(cfg: Any, given: Given | None = None) -> Iterator[Run]:
    """Open the run of ``cfg``: check it, claim the folder and write its resolved ``config.yaml``, seed,
    load the tokenizer (unless ``given`` holds one), start the plan. Every check comes before anything
    is written. A model given in memory is recorded in ``model.path`` by the name it was loaded from,
    when the config names none.

    When the body raises: before training began, the run folder is put back as it was (see
    :class:`~preftune.system.runfolder.Claim`); once it has, it is marked ``failed`` with the error. The
    folder's lock is released when the block ends."""
    given = given or Given()
    with quiet_transformers_bars():
        run = _open(cfg, given)
        try:
            yield run
        except BaseException as err:
            if run.claim is not None and not run._training:  # claimed by this process, not yet training
                run.claim.undo()
            elif read_status(run.dir).get("pid") == os.getpid():  # this process started the run there
                mark(run.dir, "failed", error=f"{type(err).__name__}: {err}")
            raise
        finally:
            if run.claim is not None:
                run.claim.release()


def _open(cfg: Any, given: Given) -> Run:
    """:func:`open_run`'s checks and writes, in order; nothing is written before every check has passed."""
    validate(cfg)
    rank, processes = distributed.world()  # the launcher's: refusals come before the process group starts
    if distributed.launcher_asks_fsdp() and cfg.train.sharding == "none":  # decided here, once; config.yaml records it
        cfg.train.sharding = "fsdp"
        if rank == 0:
            print("preftune: accelerate launch asked for FSDP (ACCELERATE_USE_FSDP): train.sharding=fsdp, torch's fully_shard",
                  file=sys.stderr)
    check_supported(cfg.train, processes=processes)
    check_causal_lm(given.model, None if given.model is not None else cfg.model.path)  # before anything is written
    rank, processes = distributed.start()
    if given.model is not None and not cfg.model.path:
        cfg.model.path = str(getattr(given.model, "name_or_path", "") or "")
    if given.tokenizer is None and given.model is not None and not (cfg.model.tokenizer or cfg.model.path):
        raise PreftuneError("a model was passed in without a tokenizer, and the config names no tokenizer folder: pass tokenizer=...")
    tokenizer = given.tokenizer
    if tokenizer is None:  # before the run folder is touched: a wrong model folder leaves nothing behind
        what = "tokenizer folder (model.tokenizer)" if cfg.model.tokenizer else "model folder (model.path)"
        tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, trust_remote_code=cfg.model.trust_remote_code, what=what)
    elif tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # as the loader does: padding is masked by position
    run_dir = Path(cfg.train.output_dir)
    # every check before anything is written: the folder free, the checkpoint intact and readable, the config and data the same
    if rank == 0:
        check_folder(run_dir, cfg.train)
    start = plan_start(cfg.train, run_dir, to_dict(cfg), data_digests(cfg))
    claim = claim_folder(run_dir, cfg.train) if rank == 0 else None
    try:
        if claim is not None:
            (run_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
            mark(run_dir, "running", pid=os.getpid(), pid_start=process_start(os.getpid()), host=socket.gethostname(),
                 processor=processor_name(default_device().type), started=round(time.time(), 3))
        distributed.barrier()
    except BaseException:
        if claim is not None:  # the folder as it was before this run
            claim.undo()
            claim.release()
        raise
    seed_everything(cfg.train.seed, deterministic=cfg.train.deterministic)
    device = default_device()
    return Run(cfg, run_dir, tokenizer, device, given, start, claim=claim)


#: What status.json keeps from one write to the next (the run's decisions and where and when it started, recorded once)
STATUS_KEEPS = ("precision", "compile", "processor", "started")


def mark(run_dir: Path, status: str, **info: Any) -> None:
    """Write ``status.json``: ``running``, ``finished`` or ``failed`` (with what stopped it), keeping
    what an earlier write recorded of :data:`STATUS_KEEPS`."""
    before = read_status(run_dir)
    kept = {key: before[key] for key in STATUS_KEEPS if key in before and key not in info}
    (run_dir / STATUS_FILE).write_text(json.dumps({"status": status, **kept, **info}, indent=1), encoding="utf-8")


def with_precision(cfg: Any, precision: PrecisionChoice) -> Any:
    """``cfg`` with ``train.bf16`` as the run resolved it (what ``config.yaml``, the trackers and checkpoints record)."""
    return replace(cfg, train=replace(cfg.train, bf16=precision.bf16))


def record_choices(run_dir: Path, cfg: Any, precision: PrecisionChoice, compile_choice: CompileChoice) -> None:
    """The run's resolved precision into ``config.yaml`` (``train.bf16``), and both choices with their
    reasons into ``status.json`` (``precision``, ``compile``)."""
    (run_dir / "config.yaml").write_text(to_yaml(with_precision(cfg, precision)), encoding="utf-8")
    status = read_status(run_dir)
    for key in STATUS_KEEPS:
        status.pop(key, None)
    mark(run_dir, status.pop("status", "running"), **status, precision=precision.record(), compile=compile_choice.record())


def record_data(run: Run, reports: dict[str, Any], train: list[Any], what: str) -> None:
    """Write ``data_report.json`` (the main process) and add to the run's start line what was kept,
    dropped or cut (``what``: "pairs", "records", ...); stop when nothing is left to train on (the
    report then in the message: the run folder is put back as it was, without it)."""
    summaries = {split: _data_summary(report, what) for split, report in reports.items() if report}
    if not train:
        raise PreftuneError(f"no training {what} are left after loading and truncation ({summaries.get('train') or 'no records'}).")
    if distributed.is_main():
        (run.dir / "data_report.json").write_text(json.dumps(reports, indent=1), encoding="utf-8")
    run.about += [f"{split} data: {summary}" + (" (see data_report.json)" if "," in summary else "") for split, summary in summaries.items()]


def _data_summary(report: dict[str, Any], what: str) -> str:
    """'kept K of N pairs', then ', dropped ...' and ', cut ...' when something was."""
    dropped = {k: v for k, v in report.get("dropped", {}).items() if v}
    cut = {k: v for k, v in report.get("truncation", {}).items() if v and k != "dropped"}
    parts = [f"kept {report.get('kept', 0)} of {report.get('records', 0)} {what}"]
    parts += [f"dropped {', '.join(f'{v} {k}' for k, v in dropped.items())}"] if dropped else []
    parts += [f"cut {', '.join(f'{v} {k}' for k, v in cut.items())}"] if cut else []
    return ", ".join(parts)


def data_digests(cfg: Any) -> dict[str, str]:
    """The sha256 of each local data file ``cfg.data`` names (hashed once per process while unchanged)."""
    return source_digests([*cfg.data.train, *cfg.data.eval]) if hasattr(cfg, "data") else {}


def policy_saver(run: Run, policy: nn.Module) -> Any:
    """``Task.save_final`` for a causal LM policy: the model, the tokenizer and the run's config."""

    def save_final(folder: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        save_policy(policy, run.tokenizer, folder, merge=run.cfg.model.lora.merge_on_save, state_dict=state_dict)
        write_config(run, folder)

    return save_final


def write_config(run: Run, folder: Path) -> None:
    """The run's resolved config beside a saved model (``preftune_config.yaml``)."""
    (folder / "preftune_config.yaml").write_text(to_yaml(run.cfg), encoding="utf-8")


def start_line(run: Run, task: Task) -> str:
    """``preftune: dpo: model M (N parameters); train data: kept ...; reference copy; train.bf16 auto ->
    off (why); train.compile auto -> off (why)``: what is about to run, in one line."""
    from preftune.config.schema import STAGES

    cfg, plan, train = run.cfg, run.plan, run.cfg.train
    stage = next((name for name, cls in STAGES.items() if isinstance(cfg, cls)), "train")
    model = task.output if task.output is not None else task.model
    params, trained = model_params(model), sum(p.numel() for p in model.parameters() if p.requires_grad)
    size = f"{params / 1e6:.2f}M parameters" + (f", {trained / 1e6:.2f}M trained" if trained != params else "")
    parts = [f"model {cfg.model.path or 'given in memory'} ({size})", *run.about]
    if plan.processes > 1:
        parts.append(f"{plan.processes} processes x batch {train.batch_size} x grad_accum {train.grad_accum} = global batch "
                     f"{plan.global_batch * train.grad_accum} per optimizer step "
                     f"({'sharded: FSDP2' if train.sharding == 'fsdp' else 'data parallel'})")
    parts += [plan.precision.line(), plan.compile.line()]
    return f"preftune: {stage}: " + "; ".join(parts)


def write_report_or_warn(run_dir: Path) -> None:
    """report.html for a finished run; a failure here is reported, and the trained model kept."""
    from preftune.report.html import write_report

    try:
        write_report(run_dir)
    except Exception as err:  # noqa: BLE001 - the run itself succeeded; say why the report did not
        warnings.warn(f"the run finished and its model is saved, but report.html could not be written: {err}", stacklevel=2)


def count_weight(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A preference loss (DPO's family, KTO) is a weighted mean over records: its denominator is the sum of weights."""
    return {"weight": batch["weight"].sum()}

"""The one training loop, shared by every stage (DPO and its family, SFT, reward models).

Read it top to bottom: batch, forward, loss, backward, accumulate, clip, step, schedule, log,
evaluate, checkpoint. A stage hands it a :class:`Task` (what to optimise, how to score a batch
and what the loss is a mean over); the loop computes no objective itself. Its one piece of
preference knowledge is a warning: when a task logs DPO's ``logps/chosen`` and ``rewards/margins``,
it watches them for likelihood displacement. ``accelerate`` places the model, runs autocast (in
the run's precision, :mod:`preftune.training.precision`) and wraps the model for multi-process runs;
with ``train.sharding=fsdp`` torch's FSDP2 shards it instead (:mod:`preftune.training.sharding`); there
is no communication code here. The report, the data report and the final save belong to the stages.

Gradient accumulation is exact for every task: before the forward passes of an optimizer step,
the loop sums each micro-batch's :attr:`Task.counts` (the examples, weights or tokens that the
loss is a mean over) over the whole step, and the task divides by those totals. So the
micro-batches' losses add up to the loss of the step's full batch, and 8 micro-batches of 1
give the update of one batch of 8, for a per-example mean (DPO, reward models) and a per-token
mean (SFT) alike.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preftune.config.schema import TrainConfig
from preftune.errors import PreftuneError, TrainingError
from preftune.models.compiled import compile_stats
from preftune.system.distributed import all_gather, all_sum, world
from preftune.training.callbacks import Callbacks, DisplacementWatch
from preftune.training.checkpoint import LoopState, load_checkpoint, non_finite, prune_checkpoints, rng_state, save_checkpoint
from preftune.training.compile_choice import compile_for_run
from preftune.training.evaluate import evaluate_held_out
from preftune.training.interrupts import Interrupted, StopSignals
from preftune.training.optim import make_optimizer, make_scheduler
from preftune.training.precision import new_accelerator
from preftune.training.runlog import MetricWindow, log_record, start_trackers, truncate_metrics
from preftune.training.runplan import RunPlan
from preftune.training.sharded_checkpoint import load_sharded_state, save_sharded_checkpoint
from preftune.training.sharding import clip_grad_norm, full_state_dict, no_sync, part_of, say_held, shard_model
from preftune.training.task import Task, check_shards, epoch_batches, shard, sum_counts, to_device


@dataclass
class Fitted:
    """What a finished :func:`fit` knows: where it stopped, the last metrics, and who stopped it."""

    state: LoopState
    metrics: dict[str, float] = field(default_factory=dict)  # the last training log line and the final evaluation
    stopped_by: str | None = None  # the callback that asked to stop early, if one did


def fit(task: Task, plan: RunPlan, cfg: TrainConfig, run_dir: Path, callbacks: Sequence[Any] = (),
        hparams: dict[str, Any] | None = None) -> Fitted:
    """Train ``task.model`` as ``cfg`` says; write metrics, checkpoints and the final model.

    ``callbacks`` are told about each step, log line, evaluation and checkpoint, and may stop
    the run early (:mod:`preftune.training.callbacks`). ``hparams`` (the whole resolved config) go to the
    trackers of ``train.report_to`` (:mod:`preftune.training.trackers`). A SIGTERM or SIGINT ends the run
    after the current step with a checkpoint (:mod:`preftune.training.interrupts`). The run's decisions
    (resume point, global batch, steps, precision, compile) are ``plan``'s, made as the run opened and
    once its model was built (:mod:`preftune.training.runplan`): the loop reads them, never decides.
    """
    with StopSignals() as signals:
        return _fit(task, cfg, Path(run_dir), callbacks, hparams, signals, plan)


def _fit(task: Task, cfg: TrainConfig, run_dir: Path, callbacks: Sequence[Any], hparams: dict[str, Any] | None,
         signals: StopSignals, plan: RunPlan) -> Fitted:
    """The loop: for each optimizer step, its micro-batches (the data position), then :func:`_step`
    (batch, forward, loss, backward, accumulate, clip, step, schedule), then log, evaluate and
    checkpoint as ``cfg`` asks; a stop signal ends it after the step with a checkpoint."""
    from tqdm.auto import tqdm

    run = _start(task, cfg, run_dir, callbacks, hparams, plan)
    state = run.state
    bar = tqdm(total=run.total_steps, initial=state.step, disable=not cfg.progress or not run.accelerator.is_main_process, desc="train")
    run.model.train()
    run.started, run.tokens_at_start = time.perf_counter(), state.tokens_seen
    stopped_by: str | None = None
    while state.step < run.total_steps:
        batches = epoch_batches(task, plan.global_batch, cfg.seed, state.epoch)
        # The micro-batches of this epoch not consumed yet, in groups of grad_accum.
        remaining = batches[state.batches_in_epoch :]
        if not remaining:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            continue
        group = remaining[: cfg.grad_accum]  # global micro-batches; this process trains on its shard of each
        step_loss, grad_norm = _step(run, group)
        state.batches_in_epoch += len(group)
        if state.batches_in_epoch >= len(batches):
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
        run.window.add({"grad_norm": torch.as_tensor(float(grad_norm))})
        stopped_by = run.fire("on_step_end", {"loss": float(step_loss), "grad_norm": float(grad_norm), "lr": run.scheduler.get_last_lr()[0]})

        last = state.step == run.total_steps or stopped_by is not None
        if state.step % cfg.log_every == 0 or last:
            stopped_by = _log(run, len(batches), bar, stopped_by)
        if cfg.eval_every and state.step % cfg.eval_every == 0 and not last:
            evaluated = evaluate_held_out(task, run.model, cfg, run.accelerator)
            log_record({"step": state.step, **evaluated}, run.metrics_path, run.trackers, run.accelerator)
            stopped_by = stopped_by or run.fire("on_evaluate", evaluated)
        if cfg.save_every and state.step % cfg.save_every == 0:
            run.last_checkpoint = _checkpoint(run)
            stopped_by = stopped_by or run.fire("on_save", {"path": str(run.last_checkpoint)})
        bar.update(1)
        if signals.pending(run.processes) and not last:
            _stop_on_signal(run, signals, bar)
        if stopped_by is not None:
            break
    bar.close()
    return _finish(run, stopped_by)


@dataclass
class _Run:
    """What :func:`_start` sets up once for a fit, and the loop's named steps share."""

    task: Task
    cfg: TrainConfig
    run_dir: Path
    hparams: dict[str, Any] | None
    accelerator: Any
    model: nn.Module  # as prepared by accelerate (or sharded in place)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: list[nn.Parameter]
    state: LoopState
    total_steps: int
    rank: int
    processes: int
    sharded: bool
    compiling: bool
    compiled_before: dict[str, float]
    trackers: Any
    hooks: Callbacks
    last_checkpoint: Path | None
    plan: RunPlan
    window: MetricWindow = field(default_factory=MetricWindow)
    watch: DisplacementWatch = field(default_factory=DisplacementWatch)
    last_record: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0
    tokens_at_start: int = 0

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def fire(self, event: str, metrics: dict[str, Any]) -> str | None:
        """Callbacks run on the main process; its answer (stop or not) holds for every process."""
        answer = self.hooks.fire(event, self.state.step, metrics) if self.rank == 0 else None
        return all_gather(answer)[0] if self.processes > 1 else answer


def _start(task: Task, cfg: TrainConfig, run_dir: Path, callbacks: Sequence[Any], hparams: dict[str, Any] | None, plan: RunPlan) -> _Run:
    """As ``plan`` says: the accelerator in the run's precision, shards, optimizer, compiled layers, schedule, resumed state and trackers."""
    from accelerate import Accelerator

    run_dir.mkdir(parents=True, exist_ok=True)
    precision = plan.precision
    accelerator = new_accelerator(Accelerator, precision)
    rank, processes = world()
    if not task.train_set:
        raise PreftuneError("the training set is empty after loading and truncation: nothing to train on.")
    check_shards(len(task.train_set), plan)
    total_steps = plan.total_steps(cfg, len(task.train_set))
    sharded = cfg.sharding == "fsdp"
    if sharded:  # before the optimizer is made: it steps this process's shards (training/sharding.py)
        shard_model(task.model, bf16=precision.bf16)
    params = [p for p in task.model.parameters() if p.requires_grad]
    if not params:
        raise PreftuneError("the model has no trainable parameters.")
    optimizer = make_optimizer(params, cfg)
    # lazily: the first steps pay the compile time, which the log reports apart from the step time
    compiling = compile_for_run(plan.compile, task.model)
    compiled_before = compile_stats() if compiling else {}
    model, optimizer = (task.model, optimizer) if sharded else accelerator.prepare(task.model, optimizer)

    scheduler = make_scheduler(optimizer, cfg, total_steps)

    state = LoopState()
    if plan.resume is not None:
        state = load_checkpoint(plan.resume, model=accelerator.unwrap_model(model), optimizer=optimizer, scheduler=scheduler,
                                rank=rank, global_batch=plan.global_batch, restore_sharded=load_sharded_state, verified=True)
    state.global_batch, state.compiled, state.bf16 = plan.global_batch, compiling, precision.bf16  # what a resume takes over
    truncate_metrics(run_dir / "metrics.jsonl", state.step)
    trackers = start_trackers(cfg, run_dir, hparams) if accelerator.is_main_process else None
    return _Run(task, cfg, run_dir, hparams, accelerator, model, optimizer, scheduler, params, state, total_steps, rank, processes,
                sharded, compiling, compiled_before, trackers, Callbacks(callbacks), last_checkpoint=plan.resume, plan=plan)


def _step(run: _Run, group: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on ``group`` (global micro-batches; this process trains on its shard of
    each): forward, loss, backward and accumulate each micro-batch, then clip, step and schedule.
    Nothing is applied when a loss or the gradient is not finite. Returns the global batch's loss and the gradient norm."""
    task, state, accelerator, processes = run.task, run.state, run.accelerator, run.processes
    local = [shard(indices, run.rank, processes) for indices in group]
    micro_batches = [to_device(task.collate([task.train_set[j] for j in indices]), accelerator.device) for indices in local]
    # The step's totals over every process: each share is then of the GLOBAL batch's loss.
    totals = {name: all_sum(value) for name, value in sum_counts(micro_batches, task.counts).items()}
    step_loss = torch.zeros((), device=accelerator.device)
    step_tokens = 0
    for i, batch in enumerate(micro_batches):
        with accelerator.autocast():
            loss, metrics = task.loss_fn(run.model, batch, totals)
        finite = torch.isfinite(loss.detach()).float()
        if processes > 1:  # every process stops together, or none does
            finite = all_sum(finite.cpu()) == processes
        if not finite:
            raise TrainingError(
                f"step {state.step + 1}: the loss is {loss.item()} (not finite) on {_records(task, local[i])}; training stopped before "
                f"the update, and {_kept(run.last_checkpoint, run.cfg, state.step)}. Lower train.lr, check the data, or use "
                "train.max_grad_norm."
            )
        # loss is this micro-batch's share of the step's loss (divided by the step's totals),
        # so the shares add up to the full batch's loss and its gradient (module docstring).
        # DDP averages gradients over the processes; the shares are of the global loss, so scale back.
        with no_sync(accelerator, run.model, last=i == len(group) - 1):
            accelerator.backward(loss * processes if processes > 1 else loss)
        step_loss = step_loss + loss.detach().float()
        run.window.add(metrics)
        # real (non-padding) tokens; packed batches carry a 4D mask and say it themselves
        step_tokens += int(batch["real_tokens"].sum() if "real_tokens" in batch else batch["attention_mask"].sum())
    step_loss = all_sum(step_loss)  # the global batch's loss
    run.window.add({"loss": step_loss.expand(sum(len(indices) for indices in local))})
    state.examples_seen += sum(len(indices) for indices in group)
    state.tokens_seen += int(all_sum(torch.tensor(float(step_tokens))))
    grad_norm = (clip_grad_norm if run.sharded else accelerator.clip_grad_norm_)(run.params, run.cfg.max_grad_norm or float("inf"))
    if not math.isfinite(float(grad_norm)):  # a finite loss can still have an inf/NaN gradient: never apply it
        raise TrainingError(f"step {state.step + 1}: the gradient norm is {float(grad_norm)} (not finite) on "
                            f"{_records(task, [j for indices in local for j in indices])}; training stopped "
                            f"before the update, and {_kept(run.last_checkpoint, run.cfg, state.step)}. Lower train.lr, or check the data.")
    run.optimizer.step()
    if run.sharded and state.step == 0:  # what each process holds, measured once (training/sharding.py)
        say_held(run.params, run.optimizer)
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    if task.after_step is not None:
        task.after_step(state.step)
    return step_loss, grad_norm


def _log(run: _Run, batches_in_epoch: int, bar: Any, stopped_by: str | None) -> str | None:
    """One line of metrics.jsonl (the means since the last line, the rate without compile time); who stops the run:
    ``stopped_by``, else the callbacks' answer to the line."""
    state = run.state
    means = run.window.means()
    run.window = MetricWindow()
    compiled = {k: v - run.compiled_before[k] for k, v in compile_stats().items()} if run.compiling else {}
    elapsed = time.perf_counter() - run.started - compiled.get("compile/seconds", 0.0)  # step time without compiling
    record = {"step": state.step, "epoch": state.epoch + state.batches_in_epoch / batches_in_epoch, **means,
              "lr": run.scheduler.get_last_lr()[0], "num_tokens": state.tokens_seen, **compiled,
              "tokens_per_second": (state.tokens_seen - run.tokens_at_start) / max(elapsed, 1e-9)}
    log_record(record, run.metrics_path, run.trackers, run.accelerator)
    run.last_record = record
    stopped_by = stopped_by or run.fire("on_log", record)
    run.watch.update(means, state.step)
    bar.set_postfix({k: f"{means[k]:.4g}" for k in ("loss", "rewards/accuracies", "accuracy") if k in means})
    return stopped_by


def _checkpoint(run: _Run) -> Path:
    """Write checkpoints/step-N from a finite state (every process gathers its RNG, the main one writes;
    sharded: every process writes its part, training/sharded_checkpoint.py)."""
    task, cfg, state, accelerator = run.task, run.cfg, run.state, run.accelerator
    path = run.run_dir / "checkpoints" / f"step-{state.step}"
    if run.sharded:
        save_sharded_checkpoint(path, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler, state=state, output=task.output,
                                export=task.save_model or task.save_final, rng=all_gather(rng_state()), config=run.hparams)
        if cfg.save_total_limit and accelerator.is_main_process:
            prune_checkpoints(run.run_dir, cfg.save_total_limit)
        return path
    bad = non_finite({n: p.detach() for n, p in accelerator.unwrap_model(run.model).named_parameters() if p.requires_grad})
    if bad:
        raise TrainingError(f"step {state.step}: the weights are not finite ({', '.join(bad[:3])}); no checkpoint written, "
                            f"and {_kept(run.last_checkpoint, cfg, state.step)}. Lower train.lr, or check the data.")
    rngs = all_gather(rng_state())
    if accelerator.is_main_process:
        save_checkpoint(path, model=accelerator.unwrap_model(run.model), optimizer=run.optimizer, scheduler=run.scheduler,
                        state=state, export=task.save_model or task.save_final, rng=rngs, config=run.hparams, data=run.plan.data_digests)
        if cfg.save_total_limit:
            prune_checkpoints(run.run_dir, cfg.save_total_limit)
    return path


def _stop_on_signal(run: _Run, signals: StopSignals, bar: Any) -> None:
    """A SIGTERM or SIGINT came during the step: checkpoint it (unless just written) and stop, saying how to continue."""
    if run.last_checkpoint != run.run_dir / "checkpoints" / f"step-{run.state.step}":
        run.last_checkpoint = _checkpoint(run)
    bar.close()
    if run.trackers is not None:
        run.trackers.finish()
    raise Interrupted(f"stopped by {signals.name} after step {run.state.step}: checkpoint '{run.last_checkpoint}'; continue with "
                      "--train.resume_from=latest and the same config.", signals.received or 15)


def _finish(run: _Run, stopped_by: str | None) -> Fitted:
    """The final evaluation, the trackers closed, and the final model (a sharded run's gathered from every process)."""
    task, state, accelerator = run.task, run.state, run.accelerator
    final_eval = evaluate_held_out(task, run.model, run.cfg, accelerator)
    if final_eval:
        log_record({"step": state.step, **final_eval}, run.metrics_path, run.trackers, accelerator)
        run.fire("on_evaluate", final_eval)
    if run.trackers is not None:
        run.trackers.finish()
    accelerator.wait_for_everyone()
    if task.save_final is not None and run.sharded:  # every process gathers; the main one writes
        weights = part_of(full_state_dict(run.model), run.model, task.output or run.model)
        if accelerator.is_main_process:
            task.save_final(run.run_dir / "final", state_dict=weights)
    elif task.save_final is not None and accelerator.is_main_process:
        task.save_final(run.run_dir / "final")
    metrics = {k: v for k, v in {**run.last_record, **final_eval}.items() if k != "step"}
    return Fitted(state, metrics, stopped_by)


def _kept(last_checkpoint: Path | None, cfg: TrainConfig, step: int) -> str:
    """What is left to resume from after a stop (every checkpoint holds finite weights: no update
    with a non-finite loss or gradient is ever applied)."""
    if last_checkpoint:
        return f"the last good checkpoint is '{last_checkpoint}'"
    if cfg.save_every:
        return f"no checkpoint was written yet (the first is due at step {cfg.save_every})"
    return "no checkpoint was written (set train.save_every to keep some)"


def _records(task: Task, indices: list[int]) -> str:
    """The batch's records by where they were read (file, line), for an error that must name them."""
    return "records " + ", ".join(str(getattr(task.train_set[j], "source", None) or f"item {j}") for j in indices[:8]) + " ..." * (len(indices) > 8)

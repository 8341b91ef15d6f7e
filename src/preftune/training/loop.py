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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preftune.config.schema import TrainConfig
from preftune.errors import PreftuneError, TrainingError
from preftune.models.compiled import compile_stats
from preftune.system.distributed import all_gather, all_sum, world
from preftune.system.progress import batches
from preftune.training.callbacks import Callbacks, DisplacementWatch
from preftune.training.checkpoint import LoopState, load_checkpoint, non_finite, prune_checkpoints, resolve_resume, rng_state, save_checkpoint
from preftune.training.compile_choice import CompileChoice, compile_for_run
from preftune.training.interrupts import Interrupted, StopSignals
from preftune.training.optim import make_optimizer, make_scheduler
from preftune.training.precision import PrecisionChoice, new_accelerator, resolve_precision
from preftune.training.runlog import MetricWindow, log_record, start_trackers, truncate_metrics
from preftune.training.sharded_checkpoint import load_sharded_state, save_sharded_checkpoint
from preftune.training.sharding import clip_grad_norm, full_state_dict, is_sharded, no_sync, part_of, say_held, shard_model

Batch = dict[str, Any]
#: (batch) -> the sums a loss is normalised by, e.g. {"weight": sum of example weights} or
#: {"tokens": scored tokens}; summed over an optimizer step's micro-batches into ``totals``.
CountFn = Callable[[Batch], dict[str, torch.Tensor]]
#: (model as prepared by accelerate, batch, totals) -> (this micro-batch's share of the step's
#: loss: its sums divided by ``totals``, metrics). Metrics are per-example tensors (B,) or
#: scalars; the loop averages them.
LossFn = Callable[[nn.Module, Batch, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def count_examples(batch: Batch) -> dict[str, torch.Tensor]:
    """The default :data:`CountFn`: examples (rows of ``weight``)."""
    return {"examples": torch.tensor(float(batch["weight"].shape[0]))}


@dataclass
class Task:
    """What a stage gives the loop."""

    model: nn.Module  # the module run on batches; its trainable parameters are optimised
    loss_fn: LossFn
    train_set: Sequence[Any]
    collate: Callable[[list[Any]], Batch]
    lengths: list[int]  # tokens per train item, for length grouping
    counts: CountFn = count_examples  # what loss_fn's means are over (see the module docstring)
    eval_set: Sequence[Any] | None = None
    save_final: Callable[..., None] | None = None  # write the final model to a folder (state_dict=: a sharded run's, gathered)
    save_model: Callable[..., None] | None = None  # the same into each checkpoint (default: save_final)
    group_by_length: bool = True
    output: nn.Module | None = None  # what the stage produces (the policy, the reward model): the Python API returns it
    compile: CompileChoice | None = None  # train.compile as the stage resolved it (None: the loop resolves it)
    precision: PrecisionChoice | None = None  # train.bf16 as the stage resolved it (None: the loop resolves it)
    data_digests: dict[str, str] | None = None  # sha256 of each data file, kept in checkpoints: a resume on changed data is refused
    after_step: Callable[[int], None] | None = None  # called on every process after each optimizer step (TR-DPO's reference sync)
    about: Sequence[str] = ()  # what the run's start line says of the data and the reference (stages.common.start_line)


def sum_counts(batches: Sequence[Batch], counts: CountFn) -> dict[str, torch.Tensor]:
    """Each count summed over ``batches`` (an optimizer step's micro-batches)."""
    totals: dict[str, torch.Tensor] = {}
    for batch in batches:
        for name, value in counts(batch).items():
            value = torch.as_tensor(value, dtype=torch.float32)
            totals[name] = totals[name] + value if name in totals else value
    return totals


def epoch_batches(task: Task, cfg: TrainConfig, epoch: int, processes: int = 1) -> list[list[int]]:
    """The epoch's GLOBAL micro-batches (``batch_size`` per process, so ``batch_size x processes``
    items each), length-grouped over the whole set exactly as one process with that batch would."""
    from preftune.data.collate import LengthGroupedBatchSampler

    sampler = LengthGroupedBatchSampler(
        task.lengths, cfg.batch_size * processes, seed=cfg.seed, shuffle=True, group_by_length=task.group_by_length
    )
    sampler.set_epoch(epoch)
    return list(sampler)


def shard(indices: list[int], rank: int, processes: int) -> list[int]:
    """This process's contiguous part of a global micro-batch (parts differ in size by one at most)."""
    base, extra = divmod(len(indices), processes)
    start = rank * base + min(rank, extra)
    return indices[start : start + base + (1 if rank < extra else 0)]


def _check_shards(n_items: int, cfg: TrainConfig, processes: int) -> None:
    """Every process needs an example in every micro-batch (DDP runs the step on all of them)."""
    if processes == 1:
        return
    tail = n_items % (cfg.batch_size * processes)
    if n_items < processes or 0 < tail < processes:
        raise PreftuneError(
            f"{n_items} training items in global batches of {cfg.batch_size} x {processes} processes leave a last batch of "
            f"{tail or n_items} for {processes} processes; choose train.batch_size so that each process gets at least one "
            "example of every batch (or run on fewer processes)."
        )


def evaluate_held_out(task: Task, model: nn.Module, cfg: TrainConfig, accelerator: Any) -> dict[str, float]:
    """Mean metrics over the held-out set, in a fixed order, without gradients.

    ``eval/loss`` is the loss of the whole held-out set as one batch (each batch's share of the
    set's totals, summed), so it does not depend on how the set is batched or split; the other
    metrics are per-example means. With several processes each scores every n-th item and the
    means are taken over all of them; the model runs unwrapped (no DDP collectives in a loop
    whose length differs between processes). A sharded model gathers each layer from every
    process in each forward, so there every process runs as many batches as the busiest one
    (the extra ones on a repeated item, their results unused).
    """
    if not task.eval_set:
        return {}
    rank, processes = world()
    items = list(task.eval_set)[rank::processes]
    size = cfg.eval_batch_size or cfg.batch_size
    window = MetricWindow()
    was_training = model.training
    model.eval()
    net = accelerator.unwrap_model(model)
    starts = range(0, len(items), size)
    # The set's totals first (collating is cheap next to the forward passes), then each batch's share.
    local = sum_counts([task.collate(items[start : start + size]) for start in starts], task.counts) if items else {}
    names = sorted(set().union(*all_gather(sorted(local))))
    totals = {name: all_sum(local.get(name, torch.tensor(0.0))) for name in names}
    loss_sum = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for start in batches(len(items), size, desc="eval", enabled=cfg.progress and rank == 0):
            batch = _to_device(task.collate(items[start : start + size]), accelerator.device)
            with accelerator.autocast():
                loss, metrics = task.loss_fn(net, batch, totals)
            loss_sum += float(loss.detach())
            window.add(metrics)
        for _ in range(max(all_gather(len(starts))) - len(starts) if is_sharded(net) else 0):
            task.loss_fn(net, _to_device(task.collate(list(task.eval_set)[:1]), accelerator.device), totals)
    model.train(was_training)
    return {"eval/loss": float(all_sum(loss_sum)), **{f"eval/{k}": v for k, v in window.means().items()}}


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class Fitted:
    """What a finished :func:`fit` knows: where it stopped, the last metrics, and who stopped it."""

    state: LoopState
    metrics: dict[str, float] = field(default_factory=dict)  # the last training log line and the final evaluation
    stopped_by: str | None = None  # the callback that asked to stop early, if one did


def fit(task: Task, cfg: TrainConfig, run_dir: Path, callbacks: Sequence[Any] = (), hparams: dict[str, Any] | None = None) -> Fitted:
    """Train ``task.model`` as ``cfg`` says; write metrics, checkpoints and the final model.

    ``callbacks`` are told about each step, log line, evaluation and checkpoint, and may stop
    the run early (:mod:`preftune.training.callbacks`). ``hparams`` (the whole resolved config) go to the
    trackers of ``train.report_to`` (:mod:`preftune.training.trackers`). A SIGTERM or SIGINT ends the run
    after the current step with a checkpoint (:mod:`preftune.training.interrupts`).
    """
    with StopSignals() as signals:
        return _fit(task, cfg, Path(run_dir), callbacks, hparams, signals)


def _fit(task: Task, cfg: TrainConfig, run_dir: Path, callbacks: Sequence[Any], hparams: dict[str, Any] | None,
         signals: StopSignals) -> Fitted:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    run_dir.mkdir(parents=True, exist_ok=True)
    precision = task.precision or resolve_precision(cfg, task.model, run_dir, "cuda" if torch.cuda.is_available() else "cpu")
    accelerator = new_accelerator(Accelerator, precision)
    rank, processes = world()
    _check_shards(len(task.train_set), cfg, processes)
    sharded = cfg.sharding == "fsdp"
    if sharded:  # before the optimizer is made: it steps this process's shards (training/sharding.py)
        shard_model(task.model, bf16=precision.bf16)
    params = [p for p in task.model.parameters() if p.requires_grad]
    if not params:
        raise PreftuneError("the model has no trainable parameters.")
    optimizer = make_optimizer(params, cfg)
    # lazily: the first steps pay the compile time, which the log reports apart from the step time
    compiling = compile_for_run(task.compile, cfg, task.model, len(task.train_set), run_dir, accelerator.device)
    compiled_before = compile_stats() if compiling else {}
    model, optimizer = (task.model, optimizer) if sharded else accelerator.prepare(task.model, optimizer)

    batches_per_epoch = math.ceil(len(task.train_set) / (cfg.batch_size * processes))
    if batches_per_epoch == 0:
        raise PreftuneError("the training set is empty after loading and truncation: nothing to train on.")
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    scheduler = make_scheduler(optimizer, cfg, total_steps)

    state = LoopState()
    resume = resolve_resume(cfg, run_dir, hparams, global_batch=cfg.batch_size * processes, data=task.data_digests)
    if resume is not None:
        state = load_checkpoint(resume, model=accelerator.unwrap_model(model), optimizer=optimizer, scheduler=scheduler,
                                rank=rank, global_batch=cfg.batch_size * processes, restore_sharded=load_sharded_state)
    state.global_batch, state.compiled, state.bf16 = cfg.batch_size * processes, compiling, precision.bf16  # what a resume takes over
    metrics_path = run_dir / "metrics.jsonl"
    truncate_metrics(metrics_path, state.step)
    trackers = start_trackers(cfg, run_dir, hparams) if accelerator.is_main_process else None
    last_checkpoint = resume
    watch = DisplacementWatch()
    hooks = Callbacks(callbacks)

    def fire(event: str, step: int, metrics: dict[str, Any]) -> str | None:
        """Callbacks run on the main process; its answer (stop or not) holds for every process."""
        answer = hooks.fire(event, step, metrics) if rank == 0 else None
        return all_gather(answer)[0] if processes > 1 else answer
    stopped_by: str | None = None
    last_record: dict[str, Any] = {}
    window = MetricWindow()
    bar = tqdm(total=total_steps, initial=state.step, disable=not cfg.progress or not accelerator.is_main_process, desc="train")
    model.train()
    started = time.perf_counter()
    tokens_at_start = state.tokens_seen

    def checkpoint() -> Path:
        """Write checkpoints/step-N from a finite state (every process gathers its RNG, the main one writes;
        sharded: every process writes its part, training/sharded_checkpoint.py)."""
        path = run_dir / "checkpoints" / f"step-{state.step}"
        if sharded:
            save_sharded_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, state=state, output=task.output,
                                    export=task.save_model or task.save_final, rng=all_gather(rng_state()), config=hparams)
            if cfg.save_total_limit and accelerator.is_main_process:
                prune_checkpoints(run_dir, cfg.save_total_limit)
            return path
        bad = non_finite({n: p.detach() for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad})
        if bad:
            raise TrainingError(f"step {state.step}: the weights are not finite ({', '.join(bad[:3])}); no checkpoint written, "
                                f"and {_kept(last_checkpoint, cfg, state.step)}. Lower train.lr, or check the data.")
        rngs = all_gather(rng_state())
        if accelerator.is_main_process:
            save_checkpoint(path, model=accelerator.unwrap_model(model), optimizer=optimizer, scheduler=scheduler,
                            state=state, export=task.save_model or task.save_final, rng=rngs, config=hparams, data=task.data_digests)
            if cfg.save_total_limit:
                prune_checkpoints(run_dir, cfg.save_total_limit)
        return path

    while state.step < total_steps:
        batches = epoch_batches(task, cfg, state.epoch, processes)
        # The micro-batches of this epoch not consumed yet, in groups of grad_accum.
        remaining = batches[state.batches_in_epoch :]
        if not remaining:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            continue
        group = remaining[: cfg.grad_accum]  # global micro-batches; this process trains on its shard of each
        local = [shard(indices, rank, processes) for indices in group]
        micro_batches = [_to_device(task.collate([task.train_set[j] for j in indices]), accelerator.device) for indices in local]
        # The step's totals over every process: each share is then of the GLOBAL batch's loss.
        totals = {name: all_sum(value) for name, value in sum_counts(micro_batches, task.counts).items()}
        step_loss = torch.zeros((), device=accelerator.device)
        step_tokens = 0
        for i, batch in enumerate(micro_batches):
            with accelerator.autocast():
                loss, metrics = task.loss_fn(model, batch, totals)
            finite = torch.isfinite(loss.detach()).float()
            if processes > 1:  # every process stops together, or none does
                finite = all_sum(finite.cpu()) == processes
            if not finite:
                raise TrainingError(
                    f"step {state.step + 1}: the loss is {loss.item()} (not finite) on {_records(task, local[i])}; training stopped before "
                    f"the update, and {_kept(last_checkpoint, cfg, state.step)}. Lower train.lr, check the data, or use "
                    "train.max_grad_norm."
                )
            # loss is this micro-batch's share of the step's loss (divided by the step's totals),
            # so the shares add up to the full batch's loss and its gradient (module docstring).
            # DDP averages gradients over the processes; the shares are of the global loss, so scale back.
            with no_sync(accelerator, model, last=i == len(group) - 1):
                accelerator.backward(loss * processes if processes > 1 else loss)
            step_loss = step_loss + loss.detach().float()
            window.add(metrics)
            # real (non-padding) tokens; packed batches carry a 4D mask and say it themselves
            step_tokens += int(batch["real_tokens"].sum() if "real_tokens" in batch else batch["attention_mask"].sum())
        step_loss = all_sum(step_loss)  # the global batch's loss
        window.add({"loss": step_loss.expand(sum(len(indices) for indices in local))})
        state.examples_seen += sum(len(indices) for indices in group)
        state.tokens_seen += int(all_sum(torch.tensor(float(step_tokens))))
        grad_norm = (clip_grad_norm if sharded else accelerator.clip_grad_norm_)(params, cfg.max_grad_norm or float("inf"))
        if not math.isfinite(float(grad_norm)):  # a finite loss can still have an inf/NaN gradient: never apply it
            raise TrainingError(f"step {state.step + 1}: the gradient norm is {float(grad_norm)} (not finite) on "
                                f"{_records(task, [j for indices in local for j in indices])}; training stopped "
                                f"before the update, and {_kept(last_checkpoint, cfg, state.step)}. Lower train.lr, or check the data.")
        optimizer.step()
        if sharded and state.step == 0:  # what each process holds, measured once (training/sharding.py)
            say_held(params, optimizer)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        if task.after_step is not None:
            task.after_step(state.step)
        state.batches_in_epoch += len(group)
        if state.batches_in_epoch >= len(batches):
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
        window.add({"grad_norm": torch.as_tensor(float(grad_norm))})
        stopped_by = fire("on_step_end", state.step, {"loss": float(step_loss), "grad_norm": float(grad_norm),
                                                             "lr": scheduler.get_last_lr()[0]})

        last = state.step == total_steps or stopped_by is not None
        if state.step % cfg.log_every == 0 or last:
            means = window.means()
            window = MetricWindow()
            compiled = {k: v - compiled_before[k] for k, v in compile_stats().items()} if compiling else {}
            elapsed = time.perf_counter() - started - compiled.get("compile/seconds", 0.0)  # step time without compiling
            record = {"step": state.step, "epoch": state.epoch + state.batches_in_epoch / len(batches), **means,
                      "lr": scheduler.get_last_lr()[0], "num_tokens": state.tokens_seen, **compiled,
                      "tokens_per_second": (state.tokens_seen - tokens_at_start) / max(elapsed, 1e-9)}
            log_record(record, metrics_path, trackers, accelerator)
            last_record = record
            stopped_by = stopped_by or fire("on_log", state.step, record)
            watch.update(means, state.step)
            bar.set_postfix({k: f"{means[k]:.4g}" for k in ("loss", "rewards/accuracies", "accuracy") if k in means})
        if cfg.eval_every and state.step % cfg.eval_every == 0 and not last:
            evaluated = evaluate_held_out(task, model, cfg, accelerator)
            log_record({"step": state.step, **evaluated}, metrics_path, trackers, accelerator)
            stopped_by = stopped_by or fire("on_evaluate", state.step, evaluated)
        if cfg.save_every and state.step % cfg.save_every == 0:
            last_checkpoint = checkpoint()
            stopped_by = stopped_by or fire("on_save", state.step, {"path": str(last_checkpoint)})
        bar.update(1)
        if signals.pending(processes) and not last:
            if last_checkpoint != run_dir / "checkpoints" / f"step-{state.step}":
                last_checkpoint = checkpoint()
            bar.close()
            if trackers is not None:
                trackers.finish()
            raise Interrupted(f"stopped by {signals.name} after step {state.step}: checkpoint '{last_checkpoint}'; continue with "
                              "--train.resume_from=latest and the same config.", signals.received or 15)
        if stopped_by is not None:
            break
    bar.close()

    final_eval = evaluate_held_out(task, model, cfg, accelerator)
    if final_eval:
        log_record({"step": state.step, **final_eval}, metrics_path, trackers, accelerator)
        fire("on_evaluate", state.step, final_eval)
    if trackers is not None:
        trackers.finish()
    accelerator.wait_for_everyone()
    if task.save_final is not None and sharded:  # every process gathers; the main one writes
        weights = part_of(full_state_dict(model), model, task.output or model)
        if accelerator.is_main_process:
            task.save_final(run_dir / "final", state_dict=weights)
    elif task.save_final is not None and accelerator.is_main_process:
        task.save_final(run_dir / "final")
    metrics = {k: v for k, v in {**last_record, **final_eval}.items() if k != "step"}
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

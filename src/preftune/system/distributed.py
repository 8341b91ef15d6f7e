"""The few collective steps data-parallel training needs, over accelerate's process group.

preftune has no communication code of its own beyond these calls: ``accelerate`` (under
``torchrun`` or ``accelerate launch``) starts the process group (gloo on CPU, NCCL on GPU) and
wraps the model in DDP; here are the reductions of counts and metrics, and the gathering of
small Python objects (RNG states, reference-cache rows). With one process every function is a
no-op that returns its input.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from typing import Any

import torch

from preftune.errors import PreftuneError

#: What preftune does not run across processes: data parallelism (DDP) and FSDP2 sharding do run.
UNSUPPORTED = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed", "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}


def world() -> tuple[int, int]:
    """(rank, number of processes): from the started process group, else from the launcher's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return world()[0] == 0


def start() -> tuple[int, int]:
    """Join the launcher's process group (through accelerate) and refuse what is not supported yet."""
    for variable, name in UNSUPPORTED.items():
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes"):
            raise PreftuneError(f"{name} is not supported yet ({variable} is set by the launcher); preftune runs data-parallel "
                                "(DDP) or sharded (train.sharding=fsdp, or accelerate launch with configs/accelerate/fsdp.yaml) "
                                "across processes.")
    if world()[1] > 1:
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())
        atexit.register(_leave_at_exit)  # a Python API run under torchrun: the group goes before the interpreter's teardown
    return world()


def leave() -> None:
    """After a command that ended well on every process: meet the others at a barrier (each has
    finished its last collective step), then destroy the process group.

    Left to the interpreter's exit, the group is torn down during finalization while gloo's worker
    threads may still hold work (and tensors) alive: ``std::terminate`` ("terminate called without
    an active exception"), SIGABRT, and torchrun reports a finished launch as failed (the failure
    mode described in pytorch/pytorch#190489 and #179291)."""
    atexit.unregister(_leave_at_exit)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def abandon() -> None:
    """After an error: the group is left to the interpreter's exit. Destroying it while another process
    may still wait in a collective can hang the launch (torchtitan#1342); the error is already said, and
    the exit status is an error's either way."""
    atexit.unregister(_leave_at_exit)


def _leave_at_exit() -> None:
    """At the exit of a process that started a gloo group and did not leave it (a Python script under
    torchrun): destroyed while the interpreter is whole. gloo's destroy is local to the process; an NCCL
    group is left to torch, whose destroy may wait for the other processes."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo":
        torch.distributed.destroy_process_group()


def launcher_asks_fsdp() -> bool:
    """Whether ``accelerate launch`` was given an FSDP config (it sets ``ACCELERATE_USE_FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in ("1", "true", "yes")


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over every process (a copy; float64 on CPU for counts and sums)."""
    if world()[1] == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    out = value.detach().to(device=device, dtype=torch.float64).clone()
    torch.distributed.all_reduce(out)
    return out.to(device=value.device, dtype=value.dtype)


def all_gather(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order, on every process."""
    if world()[1] == 1:
        return [obj]
    out: list[Any] = [None] * world()[1]
    torch.distributed.all_gather_object(out, obj)
    return out


def decided_on_main(decide: Callable[[], Any]) -> Any:
    """``decide()`` run on the main process alone, its answer taken by every process; a PreftuneError
    it raises is raised on every process, so none is left waiting in the gather."""
    answer: Any = None
    if world()[0] == 0:
        try:
            answer = decide()
        except PreftuneError as err:
            answer = err
    answer = all_gather(answer)[0]
    if isinstance(answer, PreftuneError):
        raise answer
    return answer


def barrier() -> None:
    if world()[1] > 1:
        torch.distributed.barrier()

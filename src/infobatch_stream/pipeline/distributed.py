"""torch.distributed, reduced to what the epoch boundary and equal steps need.

Everything here is a no-op in a single process. Work that only one rank does (the commit)
never leaves the others waiting on a dead rank: its outcome, success or the error message,
is broadcast, and every rank raises the same error.

InfoBatch's own messages (has every rank a batch? did the flush work? the commit's outcome)
travel as CPU tensors on a gloo group of their own, the *control group*, never on the
training's group: under NCCL a collective takes CUDA tensors and reading its result waits
for every kernel queued before it, and an overlapped commit talks on its group from a
thread of its own while the training loop (DDP, evaluation) uses the default group.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# (the default group it was made for, the control group): a new default group (a test, or
# a job that re-initialises) gets a control group of its own.
_control: tuple[Any, Any] | None = None


class DistributedError(RuntimeError):
    """Raised on every rank when a step failed on some rank; names the rank and the error."""


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def control_group() -> Any:
    """Collective on first use: the gloo group InfoBatch's control messages use (None alone).

    ``dist.new_group`` must be called by every rank in the same order as every other group
    creation. It happens at InfoBatch's first collective call, the first ``bound()`` or
    ``end_epoch()`` (whichever comes first), which every rank of a job reaches at the same
    point of the same program.

    >>> group = control_group()          # doctest: +SKIP
    >>> all_min(1, group)                # doctest: +SKIP
    1
    """
    global _control
    if not active():
        return None
    world = dist.group.WORLD
    if _control is None or _control[0] is not world:
        _control = (world, dist.new_group(backend="gloo"))
    return _control[1]


def _message(error: BaseException | None) -> str | None:
    return None if error is None else "".join(traceback.format_exception_only(error)).strip()


def all_ranks_ok(error: BaseException | None, what: str, group: Any = None,
                 payload: Any = None) -> list[Any]:
    """Collective: raise on every rank if ``what`` failed on any rank (None = it worked here).

    Returns every rank's ``payload`` (a small picklable value), in rank order: one gather
    carries both the outcome and what the ranks report at this point.
    """
    if not active():
        if error is not None:
            raise error
        return [payload]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, (_message(error), payload), group=group)
    failed = [(r, m) for r, (m, _) in enumerate(gathered) if m is not None]
    if failed:
        r, m = failed[0]
        if error is not None and r == rank():
            raise error
        raise DistributedError(f"{what} failed on rank {r}: {m}")
    return [p for _, p in gathered]


def on_rank_zero(fn: Callable[[], T], what: str, group: Any = None) -> T:
    """Collective: rank 0 runs ``fn``; every rank returns its result once it is done, or
    raises its error. The result travels to the other ranks, so it must be picklable."""
    if not active():
        return fn()
    result, error = None, None
    if rank() == 0:
        try:
            result = fn()
        except Exception as exc:  # re-raised below on every rank
            error = exc
    box = [(_message(error), result)]
    dist.broadcast_object_list(box, src=0, group=group)
    message, result = box[0]
    if message is not None:
        if error is not None:
            raise error
        raise DistributedError(f"{what} failed on rank 0: {message}")
    return result


def all_min(value: int, group: Any = None) -> int:
    """Collective: the smallest ``value`` over all ranks, on the CPU (pass a gloo group)."""
    if not active():
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=group)
    return int(tensor[0])

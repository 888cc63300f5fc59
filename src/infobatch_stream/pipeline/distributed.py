"""torch.distributed, reduced to what the epoch boundary and equal steps need.

Everything here is a no-op in a single process. Work that only one rank does (the commit)
never leaves the others waiting on a dead rank: its outcome, success or the error message,
is broadcast, and every rank raises the same error.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class DistributedError(RuntimeError):
    """Raised on every rank when a step failed on some rank; names the rank and the error."""


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def _device() -> torch.device:
    # NCCL only reduces CUDA tensors; every other backend takes CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_ranks_ok(error: BaseException | None, what: str) -> None:
    """Collective: raise on every rank if ``what`` failed on any rank (None = it worked here)."""
    message = None if error is None else "".join(traceback.format_exception_only(error)).strip()
    if not active():
        if error is not None:
            raise error
        return
    messages: list[Any] = [None] * world_size()
    dist.all_gather_object(messages, message)
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        r, m = failed[0]
        if error is not None and r == rank():
            raise error
        raise DistributedError(f"{what} failed on rank {r}: {m}")


def on_rank_zero(fn: Callable[[], T], what: str) -> T | None:
    """Collective: rank 0 runs ``fn``; every rank returns once it is done, or raises its error."""
    if not active():
        return fn()
    result, error = None, None
    if rank() == 0:
        try:
            result = fn()
        except Exception as exc:  # re-raised below on every rank
            error = exc
    box = [None if error is None else "".join(traceback.format_exception_only(error)).strip()]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        if error is not None:
            raise error
        raise DistributedError(f"{what} failed on rank 0: {box[0]}")
    return result


def all_min(value: int) -> int:
    """Collective: the smallest ``value`` over all ranks."""
    if not active():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())

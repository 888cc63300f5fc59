"""A diffusion score that says more about the image than about the timestep it drew.

A diffusion model's per-sample loss at one random timestep depends far more on the
timestep than on the image, and every epoch draws a new timestep. ``TimestepNormalizer``
divides each loss by the running mean loss of its timestep bucket, so a score of 1 means
"as hard as a typical image at that timestep"; optionally it blends in the sample's
previous score, so a score averages several timesteps over the epochs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from ..storage.checks import check_int, check_number
from .recorder import on_device

STATE_VERSION = 1


class TimestepNormalizer:
    """Scores for ``InfoBatch.update(..., scores=...)``: each loss over its timestep's mean loss.

    Timesteps ``0 .. num_timesteps-1`` fall into ``buckets`` equal bins. Each call adds the
    batch's losses to per-bucket sums and counts kept on the loss's device (no host sync, no
    collective) and returns ``loss / table[bucket]``. ``sync()`` folds what was added since the
    last sync into ``table``: ``table = momentum * table + (1 - momentum) * sum / count`` per
    bucket that was seen. The first sync happens by itself after ``warmup_steps`` calls; call
    ``sync()`` again at the end of each epoch, on every rank.

    Identical on every rank, by construction: the table changes only in ``sync()``, from the
    all-reduced sums and counts. An all-reduce hands every rank the same bytes, and the same
    elementwise arithmetic on the same bytes gives the same table, so a sample's score does
    not depend on the rank that trained it, and every rank checkpoints the same state. The
    automatic first sync is a collective at the ``warmup_steps``-th call: under DDP every rank
    must make the same number of calls (``InfoBatch.bound`` sees to it).

    Before the first sync there is no table: scores are NaN. The store drops NaN scores (with
    a logged count), so those samples stay unknown and are kept, weight 1, next epoch. A bucket
    no sync has seen also gives NaN.

    ``smoothing`` > 0 with ``previous`` (the batch's ``__score__`` field: the sample's last
    score, NaN if never seen) returns ``smoothing * previous + (1 - smoothing) * normalized``:
    an average over the timesteps the sample drew in earlier epochs.

    ``group``: the process group of the all-reduce (default: the world). NCCL reduces CUDA
    tensors, any other backend CPU tensors; the sums are moved to the backend's device for
    the collective, only in ``sync()``.

    >>> norm = TimestepNormalizer(num_timesteps=1000, buckets=4, warmup_steps=1)
    >>> t = torch.tensor([10, 900])
    >>> norm(torch.tensor([0.8, 0.02]), t)       # first call: no table yet, then the first sync
    tensor([nan, nan])
    >>> norm(torch.tensor([0.4, 0.04]), t)       # half, then twice the loss of its timestep
    tensor([0.5000, 2.0000])
    >>> # in the loop: ib.update(loss, keys, weights, scores=norm(loss, t, previous=scores))
    """

    def __init__(self, num_timesteps: int = 1000, buckets: int = 20, momentum: float = 0.5,
                 smoothing: float = 0.0, warmup_steps: int = 16, group: Any = None):
        self.num_timesteps = check_int(num_timesteps, "num_timesteps", 1, numpy=False)
        self.buckets = check_int(buckets, "buckets", 1, numpy=False)
        if self.buckets > self.num_timesteps:
            raise ValueError(f"buckets ({buckets}) must not exceed num_timesteps ({num_timesteps})")
        self.momentum = check_number(momentum, "momentum", 0, 1, high_open=True)
        self.smoothing = check_number(smoothing, "smoothing", 0, 1, high_open=True)
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", 0, numpy=False)
        self.group = group
        self.table = torch.full((self.buckets,), math.nan, dtype=torch.float64)
        self._sums = torch.zeros(self.buckets, dtype=torch.float64)
        self._counts = torch.zeros(self.buckets, dtype=torch.float64)
        self._calls = 0
        self.syncs = 0

    def __repr__(self) -> str:
        return (f"TimestepNormalizer(num_timesteps={self.num_timesteps}, buckets={self.buckets}, "
                f"momentum={self.momentum}, smoothing={self.smoothing}, syncs={self.syncs})")

    def bucket_of(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The bucket index of each timestep (int64, on the timesteps' device)."""
        t = timesteps.long().clamp(0, self.num_timesteps - 1)
        return t * self.buckets // self.num_timesteps

    def _on(self, device: torch.device) -> None:
        if self._sums.device != device:
            self.table = self.table.to(device)
            self._sums = self._sums.to(device)
            self._counts = self._counts.to(device)

    def __call__(self, loss: torch.Tensor, timesteps: torch.Tensor,
                 previous: Any = None) -> torch.Tensor:
        """Record the batch's losses; return their scores (float32, on the loss's device).

        ``loss``: per-sample losses, shape ``(batch,)``; ``timesteps``: the timestep each was
        drawn at; ``previous``: optional last scores (NaN for unseen), for ``smoothing``.
        """
        if loss.dim() != 1 or timesteps.shape != loss.shape:
            raise ValueError(f"need one loss and one timestep per sample, got loss "
                             f"{tuple(loss.shape)} and timesteps {tuple(timesteps.shape)}")
        self._on(loss.device)
        value = loss.detach().to(torch.float64)
        bucket = self.bucket_of(timesteps.to(loss.device, non_blocking=True))
        scores = value / self.table[bucket]
        self._sums.index_add_(0, bucket, value)
        self._counts.index_add_(0, bucket, torch.ones_like(value))
        self._calls += 1
        if self.syncs == 0 and self._calls >= self.warmup_steps:  # 0: after the first call
            self.sync()
        if previous is not None and self.smoothing > 0:
            prev = on_device(previous, loss.device).double()   # via pinned memory, no sync
            blended = self.smoothing * prev + (1 - self.smoothing) * scores
            scores = torch.where(torch.isfinite(prev), blended, scores)
        return scores.float()

    def sync(self) -> None:
        """Collective: fold every rank's sums and counts since the last sync into the table.

        Call it on every rank at the same point (the end of each epoch); without
        ``torch.distributed`` it is local. Nothing is read back to the host.
        """
        totals = torch.cat([self._sums, self._counts])
        if dist.is_available() and dist.is_initialized():
            backend = dist.get_backend(self.group)
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" \
                else torch.device("cpu")
            reduced = totals.to(device)
            dist.all_reduce(reduced, group=self.group)
            totals = reduced.to(totals.device)
        sums, counts = totals[:self.buckets], totals[self.buckets:]
        mean = sums / counts.clamp(min=1)
        blended = torch.where(torch.isnan(self.table), mean,
                              self.momentum * self.table + (1 - self.momentum) * mean)
        self.table = torch.where(counts > 0, blended, self.table)
        self._sums.zero_()
        self._counts.zero_()
        self.syncs += 1

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the settings and the synced table (what was added since is not kept).

        Take it after ``sync()``. A run restarted mid-epoch re-runs that epoch (as
        ``InfoBatch`` does), and adds its losses again from there.
        """
        return {"version": STATE_VERSION, "num_timesteps": self.num_timesteps,
                "buckets": self.buckets, "momentum": self.momentum,
                "smoothing": self.smoothing, "syncs": self.syncs,
                "table": [None if math.isnan(v) else v for v in self.table.cpu().tolist()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s table; refuses a state made with other settings."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a TimestepNormalizer state of version {STATE_VERSION}: "
                             f"{str(state)[:200]}")
        for name in ("num_timesteps", "buckets", "momentum", "smoothing"):
            if state[name] != getattr(self, name):
                raise ValueError(f"the state was made with {name}={state[name]!r}, this "
                                 f"normalizer has {name}={getattr(self, name)!r}")
        table = [math.nan if v is None else float(v) for v in state["table"]]
        device = self._sums.device
        self.table = torch.tensor(table, dtype=torch.float64, device=device)
        self._sums.zero_()
        self._counts.zero_()
        self.syncs = int(state["syncs"])
        self._calls = self.warmup_steps if self.syncs else 0

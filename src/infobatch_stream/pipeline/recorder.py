"""Recording: each sample's score goes to the epoch's delta writer; the loss is weighted.

Nothing here waits for the GPU. A batch's scores (and its key hashes, when a prepared loader
moved them to the device) are copied device-to-host with ``non_blocking=True`` into pinned
buffers, and a CUDA event is recorded after the copies. ``ScoreRecorder`` queues the batch
and hands it to the ``DeltaWriter`` once its event says the copy is complete: checked
without blocking at each later ``record``, and waited for at ``flush``. Batches reach the
writer in the order they were recorded, however late their copies complete. On the CPU the
same path completes at once.

Weights go the other way, host-to-device from pinned memory without a sync, and the weighted
mean is taken in float32 whatever the loss's dtype or the autocast state.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..stages.keyfn import check_key_hashes
from ..storage import DeltaWriter, hash_keys


@dataclass
class _InFlight:
    """One batch on its way to the host: readable once ``event`` (None: at once) is done."""

    keys: np.ndarray | torch.Tensor  # uint64 hashes, or an int64 host buffer being filled
    scores: torch.Tensor             # float32 host buffer being filled
    event: Any


def to_host(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A host copy of ``tensor`` as ``dtype``, started without waiting for the device.

    From an accelerator the copy lands in pinned memory, asynchronously: read it only after
    an event recorded behind it (``copy_event``) is done.

    >>> to_host(torch.tensor([1.5, 2.5], dtype=torch.bfloat16), torch.float32)
    tensor([1.5000, 2.5000])
    """
    source = tensor.detach()
    host = torch.empty(source.shape, dtype=dtype, pin_memory=source.device.type == "cuda")
    host.copy_(source, non_blocking=True)
    return host


def copy_event(device: torch.device) -> Any:
    """An event recorded on ``device``'s current stream after the copies queued so far (None on the CPU)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def on_device(weights: Any, device: torch.device) -> torch.Tensor:
    """``weights`` as float32 on ``device``: from the host via pinned memory, without a sync.

    >>> on_device([1.0, 2.0], torch.device("cpu"))
    tensor([1., 2.])
    """
    if isinstance(weights, torch.Tensor) and weights.device == device:
        return weights.detach().to(torch.float32)
    if isinstance(weights, torch.Tensor) and weights.device.type != "cpu":
        return weights.detach().to(device, torch.float32, non_blocking=True)
    host = torch.as_tensor(weights.detach() if isinstance(weights, torch.Tensor)
                           else np.asarray(weights), dtype=torch.float32)
    if device.type == "cpu":
        return host
    if device.type == "cuda" and not host.is_pinned():
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def weighted_mean(loss: torch.Tensor, weights: Any) -> torch.Tensor:
    """``mean(loss.float() * weights)`` in float32, whatever the loss's dtype, autocast or not.

    A weight such as ``1/(1-0.3)`` multiplied in bfloat16 would become 1.4297: the
    unbiasedness InfoBatch promises is only as good as this product.

    >>> weighted_mean(torch.tensor([1.0, 3.0], dtype=torch.bfloat16), [1.0, 2.0])
    tensor(3.5000)
    """
    device = loss.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            return (loss.float() * on_device(weights, loss.device)).mean()
    return (loss.float() * on_device(weights, loss.device)).mean()


# Batches handed to the writer at once: one ``DeltaWriter.record`` (checks, copies) per
# group instead of one per batch, off the step path's per-call cost.
BATCHES_PER_WRITE = 32


class ScoreRecorder:
    """The scores of one epoch on one rank, on their way to the store.

    Owns the epoch's ``DeltaWriter`` and the queue of batches whose device-to-host copy
    may still be running; once ``batches_per_write`` are queued, or enough rows for the
    writer to flush a delta, each ``record`` hands the writer those whose copy is done.
    ``samples`` counts every score recorded (the epoch's metrics).

    >>> recorder = ScoreRecorder(store.writer(epoch=0))                   # doctest: +SKIP
    >>> recorder.record(hash_keys(["a", "b"]), torch.tensor([0.5, 1.0]))  # doctest: +SKIP
    >>> recorder.flush()                                                  # doctest: +SKIP
    """

    def __init__(self, writer: DeltaWriter, batches_per_write: int = BATCHES_PER_WRITE):
        self.writer = writer
        self.batches_per_write = batches_per_write
        self.samples = 0
        self._queue: deque[_InFlight] = deque()
        self._queued_rows = 0

    @property
    def in_flight(self) -> int:
        """Batches recorded whose copy is not yet known complete (not yet in the writer)."""
        return len(self._queue)

    def record(self, keys: np.ndarray | torch.Tensor, scores: torch.Tensor) -> None:
        """Record ``scores`` (one per key) as the keys' latest scores, without waiting.

        ``keys``: uint64 hashes on the host, or a collated ``__key_hash__`` int64 tensor on
        any device; ``scores``: a tensor on any device, recorded detached, as float32.
        """
        if isinstance(keys, torch.Tensor) and keys.device.type != "cpu":
            keys = to_host(keys, torch.int64)
        host = to_host(scores, torch.float32)
        self._queue.append(_InFlight(keys, host, copy_event(scores.device)))
        self.samples += host.shape[0]
        self._queued_rows += host.shape[0]
        if len(self._queue) >= self.batches_per_write or \
                self._queued_rows + self.writer.pending >= self.writer.flush_rows:
            self.poll()

    def poll(self) -> None:
        """Hand the writer every batch at the queue's head whose copy is done; never waits."""
        ready = 0
        for entry in self._queue:
            if entry.event is not None and not entry.event.query():
                break
            ready += 1
        self._write(ready)

    def drain(self) -> None:
        """Wait for every copy in flight and hand the writer each batch, in recording order."""
        for entry in self._queue:
            if entry.event is not None:
                entry.event.synchronize()
        self._write(len(self._queue))

    def _write(self, count: int) -> None:
        """Hand the writer the queue's first ``count`` batches, as one record, in order."""
        if not count:
            return
        # Taken off the queue first: the writer buffers the rows before it can raise (a
        # failed background flush), so a batch is never lost nor recorded twice.
        entries = [self._queue.popleft() for _ in range(count)]
        self._queued_rows -= sum(e.scores.shape[0] for e in entries)
        # Key tensors copied from a device are checked here, where they land on the host.
        keys = [e.keys if isinstance(e.keys, np.ndarray) else check_key_hashes(hash_keys(e.keys))
                for e in entries]
        scores = entries[0].scores if count == 1 else torch.cat([e.scores for e in entries])
        self.writer.record(keys[0] if count == 1 else np.concatenate(keys), scores.numpy())

    def wait(self) -> None:
        """Wait for the background writes already started (what was buffered stays buffered)."""
        self.writer.wait()

    def flush(self) -> None:
        """Write everything recorded; when it returns, the epoch's scores are in the store."""
        self.drain()
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

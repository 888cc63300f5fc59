"""DeltaWriter: buffers one rank's (key, score) updates of an epoch and flushes delta files."""

from __future__ import annotations

import io
import logging
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from . import layout
from .checks import check_int
from .files import StoreFiles
from .keys import as_scores, hash_keys
from .tables import DELTA_SCHEMA, write_table_file

log = logging.getLogger(__name__)


def stable_sort(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, hashes[order]) with ``order = np.argsort(hashes, kind="stable")``, ~2.5x faster.

    Hashes are spread evenly over their span, so a first stable pass on the top 16 bits of
    the span (a radix sort, linear) leaves small unordered buckets in order, and the stable
    sort (timsort) that follows finishes them in near-linear time. Two stable sorts compose
    into one: the order, ties included, is exactly ``argsort``'s.
    """
    if len(hashes) < 1 << 16:
        order = np.argsort(hashes, kind="stable")
        return order, hashes[order]
    low = hashes.min()
    shift = np.uint64(max(int(hashes.max() - low).bit_length() - 16, 0))
    first = np.argsort(((hashes - low) >> shift).astype(np.uint16), kind="stable")
    bucketed = hashes[first]
    second = np.argsort(bucketed, kind="stable")
    return first[second], bucketed[second]


def last_write_wins(hashes: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Sort by hash and keep the last-written score of each hash: (hashes, scores, duplicates).

    ``hashes`` must be in write order; a stable sort keeps that order among equal hashes.
    """
    order, hashes = stable_sort(hashes)
    scores = scores[order]
    last = np.empty(len(hashes), bool)
    if len(hashes):
        np.not_equal(hashes[1:], hashes[:-1], out=last[:-1])
        last[-1] = True
    kept = int(np.count_nonzero(last))
    if kept == len(hashes):
        return hashes, scores, 0
    return hashes[last], scores[last], len(hashes) - kept


class DeltaWriter:
    """Records losses of one epoch on one rank; each ``flush()`` writes one immutable delta.

    NaN and infinite scores are dropped at ``record`` and counted (``rejected_nonfinite``),
    so they never reach the store or its mean. A buffer that reaches ``flush_rows`` rows is
    flushed on its own, which bounds the trainer's memory; with ``background=True`` that
    flush (sort, encode, write) runs on a thread of its own while training goes on, and the
    next ``flush()`` waits for it and raises its error, if any. ``run_id`` tags each delta
    with the training run that wrote it: a commit by another run does not merge it.

    >>> writer = store.writer(epoch=0, rank=0)
    >>> writer.record(["a", "b"], [0.7, 1.3])
    >>> writer.flush()                         # doctest: +SKIP
    'deltas/epoch-00000000/...-r00000-s000000-....arrow'
    """

    def __init__(self, files: StoreFiles, epoch: int, rank: int = 0, *,
                 flush_rows: int = 1 << 22, run_id: str | None = None, background: bool = False):
        self.files = files
        self.epoch = layout.check_epoch(epoch)
        self.rank = layout.check_rank(rank)
        self.flush_rows = check_int(flush_rows, "flush_rows", 1)
        if run_id is not None and not isinstance(run_id, str):
            raise TypeError(f"run_id must be a str or None, got {type(run_id).__name__}")
        self.run_id = run_id
        self.background = bool(background)
        self.rejected_nonfinite = 0  # since the last flush
        self.rows_written = 0
        self.files_written: list[str] = []
        self._hashes: list[np.ndarray] = []
        self._scores: list[np.ndarray] = []
        self._pending = 0
        self._seq = 0
        self._last_ns = 0
        self._thread: ThreadPoolExecutor | None = None
        self._in_flight: list[Future] = []

    @property
    def pending(self) -> int:
        """Rows buffered and not yet flushed."""
        return self._pending

    def record(self, keys: Any, scores: Any) -> None:
        """Buffer the latest score of each key (str/bytes keys or uint64 hashes; any numeric array)."""
        hashes = hash_keys(keys)
        values = as_scores(scores, len(hashes))
        finite = np.isfinite(values)
        if not finite.all():
            bad = len(values) - int(np.count_nonzero(finite))
            self.rejected_nonfinite += bad
            log.warning("epoch %d rank %d: dropped %d NaN/inf scores (they never enter the store)",
                        self.epoch, self.rank, bad)
            hashes, values = hashes[finite], values[finite]
        # Own the data: callers may reuse their buffers after record() returns.
        self._hashes.append(np.array(hashes, np.uint64, copy=True))
        self._scores.append(np.array(values, np.float32, copy=True))
        self._pending += len(hashes)
        if self._pending >= self.flush_rows:
            if self.background:
                self._raise_failed()
                if self._thread is None:
                    self._thread = ThreadPoolExecutor(1, thread_name_prefix="infobatch-flush")
                self._in_flight.append(self._thread.submit(self._write, self._take()))
            else:
                self.flush()

    def _take(self) -> tuple:
        """The buffer as one delta-to-be, named now so names keep the write order; then empty."""
        hashes = np.concatenate(self._hashes) if self._hashes else np.empty(0, np.uint64)
        scores = np.concatenate(self._scores) if self._scores else np.empty(0, np.float32)
        # Names sort in write order, even if the clock steps back.
        now = max(time.time_ns(), self._last_ns + 1)
        self._last_ns = now
        relpath = layout.delta_name(self.epoch, now, self.rank, self._seq, uuid.uuid4().hex[:12])
        taken = (relpath, hashes, scores, self.rejected_nonfinite)
        self._seq += 1
        self._hashes.clear()
        self._scores.clear()
        self._pending = 0
        self.rejected_nonfinite = 0
        return taken

    def _write(self, taken: tuple) -> str:
        relpath, hashes, scores, rejected = taken
        hashes, scores, duplicates = last_write_wins(hashes, scores)
        sink = io.BytesIO()
        meta = {"kind": "delta", "epoch": self.epoch, "rank": self.rank,
                "duplicates": duplicates, "rejected_nonfinite": rejected}
        if self.run_id is not None:
            meta["run_id"] = self.run_id
        write_table_file(sink, DELTA_SCHEMA, [hashes, scores], meta)
        self.files.ensure_marker(creating=True)
        committed = [e for e in map(layout.manifest_epoch, self.files.list(layout.MANIFESTS))
                     if e is not None and e >= self.epoch]
        if committed:
            log.warning(
                "%s: epoch %d is already committed (latest: %d); this delta of rank %d (%d "
                "rows) will never be merged, and the next commit's retention removes it",
                self.files.url, self.epoch, max(committed), self.rank, len(hashes))
        self.files.write_new(relpath, sink.getvalue())
        self.rows_written += len(hashes)
        self.files_written.append(relpath)
        return relpath

    def _raise_failed(self) -> None:
        """Drop finished background flushes; raise the error of the first that failed."""
        done = [f for f in self._in_flight if f.done()]
        self._in_flight = [f for f in self._in_flight if not f.done()]
        for future in done:
            future.result()

    def wait(self) -> None:
        """Wait for the background flushes; raise the error of the first that failed."""
        in_flight, self._in_flight = self._in_flight, []
        for future in in_flight:
            future.result()

    def flush(self) -> str | None:
        """Write the buffered updates as one delta file; return its path in the store (None if empty).

        Waits for background flushes first: when it returns, everything recorded is written.
        """
        self.wait()
        if not self._pending and not self.rejected_nonfinite:
            return None
        return self._write(self._take())

    def close(self) -> None:
        """Wait for background flushes and stop the flush thread (buffered rows stay buffered)."""
        try:
            self.wait()
        finally:
            if self._thread is not None:
                self._thread.shutdown(wait=True)
                self._thread = None

    def __enter__(self) -> DeltaWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            self.close()

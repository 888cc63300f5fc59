"""DeltaWriter: buffers one rank's (key, score) updates of an epoch and flushes delta files."""

from __future__ import annotations

import io
import logging
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from . import layout
from .checks import check_int
from .files import StoreFiles
from .keys import as_scores, hash_keys
from .runs import RunLease, check_fence, lease_run_id
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
    flush (sort, encode, write) runs on a thread of its own while training goes on.

    Rows change hands only on success: recorded rows stay in the writer until the delta
    holding them is durably written. A write that fails (storage down past the retry
    budget, a full disk) leaves them buffered, in their order, before anything recorded
    later; the next ``flush()`` (or ``record()`` reaching ``flush_rows``) writes them. A
    background write's failure is raised by the next call (``record``, ``flush``, ``wait``,
    ``close``); the rows go out with the write after it.

    ``lease`` (from ``ScoreStore.begin_run``) tags each delta with its run and incarnation
    and fences the writer: before each write it checks that no newer incarnation of the run
    exists (``FencedError`` if one does). ``run_id`` tags deltas without a lease (low-level
    use, incarnation 0). Delta names carry (incarnation, rank, sequence); a commit merges
    in (incarnation, sequence, rank) order; the sequence continues after this rank's deltas
    already in the epoch, so a later writer's deltas win over an earlier one's, whatever the
    clocks say.

    >>> writer = store.writer(epoch=0, rank=0)
    >>> writer.record(["a", "b"], [0.7, 1.3])
    >>> writer.flush()                         # doctest: +SKIP
    'deltas/epoch-00000000/i00000000-r00000-s000000-....arrow'
    """

    def __init__(self, files: StoreFiles, epoch: int, rank: int = 0, *,
                 flush_rows: int = 1 << 22, run_id: str | None = None, background: bool = False,
                 lease: RunLease | None = None):
        self.files = files
        self.epoch = layout.check_epoch(epoch)
        self.rank = layout.check_rank(rank)
        self.flush_rows = check_int(flush_rows, "flush_rows", 1)
        self.lease, self.run_id = _identity(lease, run_id)
        self.incarnation = 0 if lease is None else lease.incarnation
        self.background = bool(background)
        self.rows_written = 0
        self.files_written: list[str] = []
        # Recorded and not yet durably written, in record order: (hashes, scores, rejected).
        self._parts: list[tuple[np.ndarray, np.ndarray, int]] = []
        self._parts_before = 0  # parts ever released (written); numbers parts absolutely
        self._rows = 0          # rows in ``_parts`` (a count: record() asks it every call)
        self._rejected = 0      # rejected scores counted in ``_parts``
        self._unsubmitted = 0   # rows recorded since the last background submission
        self._lock = threading.Lock()
        self._failed: BaseException | None = None
        self._seq: int | None = None  # found at the first write
        self._thread: ThreadPoolExecutor | None = None
        self._in_flight: list[Future] = []

    @property
    def pending(self) -> int:
        """Rows recorded and not yet durably written (buffered, or in a write under way)."""
        return self._rows

    @property
    def rejected_nonfinite(self) -> int:
        """NaN/inf scores dropped since the last write that succeeded (a delta carries them)."""
        return self._rejected

    def record(self, keys: Any, scores: Any) -> None:
        """Buffer the latest score of each key (str/bytes keys or uint64 hashes; any numeric array).

        The rows are kept even when this call raises a background write's failure.
        """
        hashes = hash_keys(keys)
        values = as_scores(scores, len(hashes))
        finite = np.isfinite(values)
        bad = 0
        if not finite.all():
            bad = len(values) - int(np.count_nonzero(finite))
            log.warning("epoch %d rank %d: dropped %d NaN/inf scores (they never enter the store)",
                        self.epoch, self.rank, bad)
            hashes, values = hashes[finite], values[finite]
        # Own the data: callers may reuse their buffers after record() returns.
        with self._lock:
            self._parts.append((np.array(hashes, np.uint64, copy=True),
                                np.array(values, np.float32, copy=True), bad))
            self._rows += len(hashes)
            self._rejected += bad
        self._unsubmitted += len(hashes)
        if self.background:
            self._raise_failed()
            if self._unsubmitted >= self.flush_rows:
                self._submit()
        elif self._rows >= self.flush_rows:
            self.flush()

    def _submit(self) -> None:
        """Write everything recorded so far on the flush thread."""
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="infobatch-flush")
        with self._lock:
            upto = self._parts_before + len(self._parts)
        self._unsubmitted = 0
        self._in_flight.append(self._thread.submit(self._write_in_background, upto))

    def _write_in_background(self, upto: int) -> None:
        """The flush thread's write of parts up to ``upto``: after a failure it writes nothing
        (the failed rows must go out first, with the next write the caller makes)."""
        with self._lock:
            if self._failed is not None:
                return
        try:
            self._write_parts(upto)
        except BaseException as exc:
            with self._lock:
                self._failed = exc

    def _write_parts(self, upto: int) -> str | None:
        """Write the oldest parts, up to part number ``upto``, as one delta; release them only
        once it is written. Returns its path (None when there was nothing to write)."""
        with self._lock:
            parts = self._parts[:upto - self._parts_before]
        if not parts:
            return None
        hashes = np.concatenate([p[0] for p in parts])
        scores = np.concatenate([p[1] for p in parts])
        rejected = sum(p[2] for p in parts)
        relpath = self._write_delta(hashes, scores, rejected) if len(hashes) or rejected else None
        with self._lock:
            del self._parts[:len(parts)]
            self._parts_before += len(parts)
            self._rows -= len(hashes)
            self._rejected -= rejected
        return relpath

    def _next_name(self) -> str:
        """A new delta name: the sequence continues after this (incarnation, rank)'s deltas
        already in the epoch, found once, so a later writer object's deltas sort later.
        Every attempt takes a new number: a write whose reply was lost may have landed."""
        if self._seq is None:
            directory = layout.delta_dir(self.epoch)
            mine = [n for n in map(layout.parse_delta_name,
                                   (f"{directory}/{name}" for name in self.files.list(directory)))
                    if n is not None and n.incarnation == self.incarnation and n.rank == self.rank]
            self._seq = max((n.seq for n in mine), default=-1) + 1
        seq, self._seq = self._seq, self._seq + 1
        return layout.delta_name(self.epoch, self.incarnation, self.rank, seq, uuid.uuid4().hex[:12])

    def _write_delta(self, hashes: np.ndarray, scores: np.ndarray, rejected: int) -> str:
        hashes, scores, duplicates = last_write_wins(hashes, scores)
        sink = io.BytesIO()
        meta = {"kind": "delta", "epoch": self.epoch, "rank": self.rank,
                "duplicates": duplicates, "rejected_nonfinite": rejected,
                "incarnation": self.incarnation}
        if self.run_id is not None:
            meta["run_id"] = self.run_id
        self.files.ensure_marker(creating=True)
        if self.lease is not None:
            check_fence(self.files, self.lease, f"write a delta of epoch {self.epoch}")
        relpath = self._next_name()
        meta["seq"] = layout.parse_delta_name(relpath).seq
        write_table_file(sink, DELTA_SCHEMA, [hashes, scores], meta)
        self._warn_if_committed(len(hashes))
        self.files.write_new(relpath, sink.getvalue())
        self.rows_written += len(hashes)
        self.files_written.append(relpath)
        return relpath

    def _warn_if_committed(self, rows: int) -> None:
        committed = [e for e in map(layout.manifest_epoch, self.files.list(layout.MANIFESTS))
                     if e is not None and e >= self.epoch]
        if committed:
            log.warning(
                "%s: epoch %d is already committed (latest: %d); this delta of rank %d (%d "
                "rows) will never be merged, and the next commit's retention removes it",
                self.files.url, self.epoch, max(committed), self.rank, rows)

    def _raise_failed(self) -> None:
        """Raise a background write's failure, once; its rows are still buffered."""
        with self._lock:
            failed, self._failed = self._failed, None
        if failed is not None:
            raise failed

    def wait(self) -> None:
        """Wait for the background writes; raise the failure of one that failed (its rows
        stay buffered for the next write)."""
        in_flight, self._in_flight = self._in_flight, []
        for future in in_flight:
            future.result()
        self._raise_failed()

    def flush(self) -> str | None:
        """Write everything recorded and not yet written as one delta file; return its path
        in the store (None if there was nothing to write).

        Waits for background writes first; if one failed, raises its error and writes
        nothing (call again: the rows are still here). When it returns, everything recorded
        is in the store.
        """
        self.wait()
        self._unsubmitted = 0
        with self._lock:
            upto = self._parts_before + len(self._parts)
        return self._write_parts(upto)

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


def _identity(lease: RunLease | None, run_id: str | None) -> tuple[RunLease | None, str | None]:
    """(lease, run id) of a writer: a lease brings its run id; ``run_id`` alone is low-level use."""
    if run_id is not None and not isinstance(run_id, str):
        raise TypeError(f"run_id must be a str or None, got {type(run_id).__name__}")
    return lease, lease_run_id(lease, run_id)

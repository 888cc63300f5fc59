"""The epoch boundary: every rank flushes, rank 0 commits, and the epoch's metrics.

``close_epoch`` is the collective: each rank writes what it recorded (waiting for its last
device-to-host copies), the ranks agree that every flush worked, rank 0 commits, and every
rank learns the outcome; an error on any rank is raised on all. ``EpochBoundary`` runs it
in the training loop (``end_epoch()``) or on a thread of its own (``end_epoch(wait=False)``),
so evaluation overlaps the commit, and holds the outcome until someone waits for it.

The thread is the only user of the control group until that wait: every caller that
talks to the other ranks (``bound()``, the next ``end_epoch()``) waits first.

The epoch's metrics (``metrics()``), plain JSON-able values for tensorboard, wandb or a log:

- ``epoch``: the epoch committed;
- ``samples_trained``: samples passed to ``update()`` on all ranks (the batch sizes);
- ``samples_pruned``: known keys the epoch's rule dropped, counted exactly from the
  snapshot it pruned from (what ``plan().pruned`` said before the epoch);
- ``saved_fraction``: ``samples_pruned / (samples_pruned + samples_trained)``;
- ``mean_score``: the mean score of the committed snapshot (next epoch's threshold);
- ``keys_updated``: keys whose score this epoch wrote;
- ``optimizer_steps``: steps ``bound()`` yielded on each rank this epoch (0 without it);
- ``commit_seconds``: the commit itself, on rank 0;
- ``blocking_seconds``: time this rank's training loop was blocked by the boundary: inside
  ``end_epoch()`` plus any later wait for its commit (the whole boundary when waited for);
- ``annealing``: whether the epoch was an annealing epoch (all data, weight 1).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..storage import Manifest
from . import distributed
from .recorder import ScoreRecorder

log = logging.getLogger(__name__)


@dataclass
class EpochClose:
    """What closing one epoch takes, captured when ``end_epoch()`` is called."""

    epoch: int
    recorder: ScoreRecorder
    commit: Callable[[], Manifest]   # rank 0's commit of the epoch
    pruned: Callable[[], int]        # known keys the epoch's rule dropped
    optimizer_steps: int
    annealing: bool
    group: Any                       # the control group (None in a single process)


def _commit(job: EpochClose) -> tuple[bytes, float, int | None]:
    """Rank 0: count what was pruned, then commit; the manifest travels as its JSON."""
    try:
        pruned: int | None = job.pruned()
    except Exception as exc:  # a metric must never cost the commit
        log.warning("epoch %d: could not count the samples pruned: %s", job.epoch, exc)
        pruned = None
    started = time.perf_counter()
    manifest = job.commit()
    return manifest.to_json(), time.perf_counter() - started, pruned


def close_epoch(job: EpochClose) -> tuple[Manifest, dict[str, Any]]:
    """Collective on ``job.group``: flush on every rank, commit on rank 0; (manifest, metrics).

    >>> manifest, metrics = close_epoch(job)   # doctest: +SKIP
    """
    error = None
    try:
        job.recorder.flush()
        job.recorder.close()
    except Exception as exc:  # raised on every rank by all_ranks_ok
        error = exc
    trained = distributed.all_ranks_ok(error, f"flushing the scores of epoch {job.epoch}",
                                       job.group, payload=job.recorder.samples)
    raw, commit_seconds, pruned = distributed.on_rank_zero(
        lambda: _commit(job), f"committing epoch {job.epoch}", job.group)
    manifest = Manifest.from_json(raw)
    return manifest, epoch_metrics(job, manifest, sum(trained), pruned, commit_seconds)


def epoch_metrics(job: EpochClose, manifest: Manifest, trained: int, pruned: int | None,
                  commit_seconds: float) -> dict[str, Any]:
    """The metrics of a committed epoch (see the module's docstring); blocking time comes later."""
    seen = trained + (pruned or 0)
    return {
        "epoch": job.epoch, "samples_trained": int(trained), "samples_pruned": pruned,
        "saved_fraction": None if pruned is None else (pruned / seen if seen else 0.0),
        "mean_score": manifest.mean, "keys_updated": manifest.updated,
        "optimizer_steps": job.optimizer_steps, "commit_seconds": commit_seconds,
        "blocking_seconds": None, "annealing": job.annealing,
    }


class EpochBoundary:
    """One rank's epoch boundaries: at most one in flight, its outcome held until waited for.

    >>> boundary.start(job, background=True, started=time.perf_counter())  # doctest: +SKIP
    >>> boundary.wait().epoch                                                # doctest: +SKIP
    3
    """

    def __init__(self) -> None:
        self.manifest: Manifest | None = None       # of the last boundary waited for
        self.metrics: dict[str, Any] | None = None
        self.failed: EpochClose | None = None       # the close whose error wait() raised
        self._job: EpochClose | None = None
        self._future: Future | None = None
        self._blocked = 0.0
        self._executor: ThreadPoolExecutor | None = None

    @property
    def pending(self) -> bool:
        """Whether a boundary was started and not yet waited for."""
        return self._future is not None

    def start(self, job: EpochClose, background: bool, started: float) -> None:
        """Close ``job``'s epoch: here and now, or on the boundary's thread (``background``).

        ``started``: when the training loop entered ``end_epoch()`` (``time.perf_counter()``).
        """
        if self._future is not None:
            raise RuntimeError("an epoch boundary is still in flight: wait() for it first")
        self._job, self.failed = job, None
        if background:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="infobatch-commit")
            self._future = self._executor.submit(close_epoch, job)
            self._future.add_done_callback(_report_failure(job.epoch))
        else:
            self._future = Future()
            try:
                self._future.set_result(close_epoch(job))
            except BaseException as exc:  # raised by wait(), in the caller, right below
                self._future.set_exception(exc)
        self._blocked = time.perf_counter() - started

    def wait(self) -> Manifest | None:
        """Wait for the boundary in flight; raise its error, or return its manifest.

        With none in flight, the last boundary's manifest (None before the first).
        """
        if self._future is None:
            return self.manifest
        started = time.perf_counter()
        future, job = self._future, self._job
        try:
            manifest, metrics = future.result()
        except BaseException:
            self._future, self._job, self.failed = None, None, job
            raise
        finally:
            self._blocked += time.perf_counter() - started
        self._future, self._job = None, None
        metrics["blocking_seconds"] = self._blocked
        self.manifest, self.metrics = manifest, metrics
        return manifest


def _report_failure(epoch: int) -> Callable[[Future], None]:
    """Log a background commit's error at once: a process that never waits still says why."""
    def report(future: Future) -> None:
        error = future.exception()
        if error is not None:
            log.warning("the overlapped commit of epoch %d failed (raised at the next call "
                        "that needs its snapshot): %s", epoch, error)
    return report

"""ScoreStore: the persistent table of every sample's last loss, on any fsspec URL.

The store is immutable files plus versioned manifests (``layout``): a run takes an
incarnation (``runs``), ranks write deltas (``DeltaWriter``), one process commits each epoch
(``commit``), retention removes what no retained epoch needs (``retention``), and readers
see whole epochs (``reader``). Every file access goes through one ``StoreFiles``.
"""

from __future__ import annotations

from typing import Any

from . import runs
from .commit import check_owner, commit_epoch
from .layout import Manifest
from .reader import StoreReader
from .retry import RetryPolicy
from .runs import RunLease
from .writer import DeltaWriter


class ScoreStore(StoreReader):
    """A score store at a local directory or any fsspec URL (``s3://bucket/runs/x/scores``).

    >>> store = ScoreStore("/tmp/scores")
    >>> with store.writer(epoch=0, rank=0) as w:
    ...     w.record(["img-1", "img-2"], [0.5, 2.0])
    >>> store.commit(0).mean
    1.25
    >>> store.snapshot().lookup(["img-2", "img-3"])
    array([ 2., nan], dtype=float32)

    ``storage_options`` go to fsspec (for S3: ``{"endpoint_url": ..., "key": ..., ...}``, or
    leave them out to use the usual AWS environment variables). Remote snapshots are
    downloaded once per machine into ``cache_dir`` (default ``$INFOBATCH_STREAM_CACHE`` or
    ``~/.cache/infobatch-stream``). ``keep_snapshots`` committed epochs are retained.
    ``retries``: how long a storage step that fails for a transient reason (connection
    refused, timeout) is tried again (a ``RetryPolicy``, or a number of attempts); past it,
    ``StoreUnavailableError`` names the URL.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None,
                 cache_dir: str | None = None, *, keep_snapshots: int = 3,
                 retries: RetryPolicy | int | None = None):
        super().__init__(url, storage_options, cache_dir, keep_snapshots=keep_snapshots,
                         retries=retries)

    def writer(self, epoch: int, rank: int = 0, *, lease: RunLease | None = None,
               **kwargs: Any) -> DeltaWriter:
        """A DeltaWriter for the updates of ``epoch`` made on ``rank`` (see ``DeltaWriter``);
        with the ``lease`` of ``begin_run``, fenced and tagged with its run and incarnation."""
        return DeltaWriter(self.files, epoch, rank, lease=lease, **kwargs)

    def begin_run(self, run_id: str | None, settings: dict[str, Any] | None = None, *,
                  takeover: bool = False) -> RunLease:
        """Start (or resume) run ``run_id`` on this store: take its next incarnation.

        Refused with ``OwnershipError`` (naming the owner: its run id, when and where it
        started) when another run owns the store: a run id differs, and no run id is a
        run id of its own (a run without one resumes a store owned by a run without one).
        Refused with ``SettingsMismatchError`` (both values of every differing setting)
        when the store's recorded ``settings`` differ; ``settings=None`` keeps the
        recorded ones. ``takeover=True`` skips both checks, on purpose. Every earlier
        incarnation is fenced from then on: its next write or commit raises ``FencedError``.

        >>> lease = store.begin_run("job-7", {"prune_ratio": 0.5, "seed": 0})  # doctest: +SKIP
        >>> with store.writer(lease.started_epoch, rank=0, lease=lease) as w:  # doctest: +SKIP
        ...     w.record(["a"], [0.5])
        >>> store.commit(lease.started_epoch, lease=lease)                     # doctest: +SKIP
        """
        return runs.begin_run(self, run_id, settings, takeover)

    def run_record(self) -> RunLease | None:
        """The newest run record (the store's owner, its settings, where it started); None
        for a store no run was ever begun on."""
        return runs.run_record(self)

    def commit(self, epoch: int, *, lease: RunLease | None = None, run_id: str | None = None,
               takeover: bool = False, duplicates_expected: bool = False) -> Manifest:
        """Merge the deltas of ``epoch`` present now into the snapshot of ``epoch``.

        Epochs commit in order; committing an epoch that is already committed returns its
        manifest and writes nothing; for the latest epoch it finishes the clean-up of an
        earlier commit of it that died after writing its manifest.

        A commit merges one run's deltas: those whose run id is the commit's (``lease``'s
        or ``run_id``; no run id matches only no run id). With a ``lease`` it merges only
        the lease's incarnation's deltas and those it ``inherited``, in (incarnation,
        sequence, rank) order, later wins, and is refused (``FencedError``) once a newer
        incarnation exists. Everything else is left out, reported, and removed by
        retention. Without a lease, a run other than the store's owner is refused
        (``OwnershipError``) unless ``takeover``. Two updates of one key in the epoch are
        counted in the manifest and warned about, unless ``duplicates_expected`` (a
        resampled stream, where keys repeat by design).
        """
        return commit_epoch(self, epoch, lease=lease, run_id=run_id, takeover=takeover,
                            duplicates_expected=duplicates_expected)

    def check_owner(self, run_id: str | None, takeover: bool = False) -> None:
        """Raise OwnershipError if another run owns this store (see ``begin_run``)."""
        check_owner(self, run_id, takeover)

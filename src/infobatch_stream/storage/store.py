"""ScoreStore: the persistent table of every sample's last loss, on any fsspec URL.

The store is immutable files plus versioned manifests (``layout``): ranks write deltas
(``DeltaWriter``), one process commits each epoch (``commit``), retention removes what no
retained epoch needs (``retention``), and readers see whole epochs (``reader``). Every file
access goes through one ``StoreFiles``.
"""

from __future__ import annotations

from typing import Any

from .commit import check_owner, commit_epoch
from .layout import Manifest
from .reader import StoreReader
from .retry import RetryPolicy
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

    def writer(self, epoch: int, rank: int = 0, **kwargs: Any) -> DeltaWriter:
        """A DeltaWriter for the updates of ``epoch`` made on ``rank`` (see ``DeltaWriter``)."""
        return DeltaWriter(self.files, epoch, rank, **kwargs)

    def commit(self, epoch: int, *, run_id: str | None = None, takeover: bool = False,
               duplicates_expected: bool = False) -> Manifest:
        """Merge every delta of ``epoch`` present now into the snapshot of ``epoch``.

        Epochs commit in order; committing an epoch that is already committed returns its
        manifest and writes nothing; for the latest epoch it finishes the clean-up of an
        earlier commit of it that died after writing its manifest. ``run_id`` is recorded in
        the manifest; a run other than the one that made the latest commit is refused
        (OwnershipError) unless ``takeover``. A commit with a ``run_id`` merges only the
        deltas its own run wrote (and untagged ones): another run's are left out, reported,
        and removed by retention. Keys updated twice in the epoch are counted in the manifest
        and warned about as colliding keys, unless ``duplicates_expected`` (resampled shards
        draw a sample more than once by design).
        """
        return commit_epoch(self, epoch, run_id, takeover, duplicates_expected)

    def check_owner(self, run_id: str | None, takeover: bool = False) -> None:
        """Raise OwnershipError if another run owns this store (see ``commit``)."""
        check_owner(self.url, self.manifest(), run_id, takeover)

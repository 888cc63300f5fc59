"""The commit protocol: an epoch's deltas + the previous snapshot -> the next epoch.

As Delta Lake and Iceberg commit: ranks flush immutable delta files; ``commit_epoch``
merges the snapshot of ``e-1`` with every delta of ``e`` present at that moment into a new
snapshot file, uploads it under a fresh name, then writes ``manifests/epoch-<e>.json`` last,
with an exclusive create. A reader sees either epoch ``e-1`` or ``e``, never a mix; a crash
anywhere loses at most the unflushed updates of the uncommitted epoch. Retention runs after.

A commit merges one run's deltas only (``selection``). With a ``RunLease`` it is fenced: a
superseded incarnation is refused (``FencedError``) before the merge and again right before
the manifest is published.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid

from . import fsio, layout, retention, runs, selection
from .errors import CorruptStoreError, StorageFullError, StoreError
from .files import cache_full_advice, is_disk_full, now
from .layout import Manifest
from .merge import merge_snapshot
from .reader import StoreReader
from .runs import RunLease
from .snapshot import ScoreSnapshot

log = logging.getLogger(__name__)


def check_owner(store: StoreReader, run_id: str | None, takeover: bool) -> None:
    """Refuse a run that does not own the store (see ``runs.owner_of``) unless ``takeover``."""
    if not takeover:
        runs.refuse_other_run(store.url, runs.owner_of(store), run_id)


def _check_committer(store: StoreReader, lease: RunLease | None, run_id: str | None,
                     takeover: bool, epoch: int) -> None:
    if lease is not None:
        runs.check_fence(store.files, lease, f"commit epoch {epoch}")
    else:
        check_owner(store, run_id, takeover)


def commit_epoch(store: StoreReader, epoch: int, *, lease: RunLease | None = None,
                 run_id: str | None = None, takeover: bool = False,
                 duplicates_expected: bool = False) -> Manifest:
    """``ScoreStore.commit``: see there for the semantics."""
    started = time.time()
    layout.check_epoch(epoch)
    run_id = runs.lease_run_id(lease, run_id)
    store.files.ensure_marker(creating=True)
    store.files.check_layout()  # before anything is written: retention walks every folder
    latest = store.latest_epoch
    _check_committer(store, lease, run_id, takeover, epoch)
    if latest is not None and epoch <= latest:
        # A lease's begin_run settled ownership: it may finish a clean-up of the previous owner.
        return _recommit(store, epoch, latest, run_id, takeover or lease is not None, started)
    expected = 0 if latest is None else latest + 1
    if epoch != expected:
        raise StoreError(
            f"{store.url}: cannot commit epoch {epoch}; the latest committed epoch is {latest}, "
            f"so the next commit must be epoch {expected} (epochs commit in order)"
        )
    previous = store.snapshot(latest) if latest is not None else ScoreSnapshot.empty()
    relpath = layout.snapshot_name(epoch, uuid.uuid4().hex)
    try:
        manifest, chosen = _write_snapshot(store, epoch, previous, relpath, latest, lease, run_id)
    except FileNotFoundError:
        # A delta listed a moment ago is gone: another process committed this epoch
        # meanwhile and its retention removed it. Its manifest stands.
        if epoch not in store.epochs:
            raise
        existing = store.manifest(epoch)
        _refuse_other_manifest(store, existing, run_id, takeover)
        return existing
    if lease is not None:  # the last moment before the epoch becomes visible
        runs.check_fence(store.files, lease, f"commit epoch {epoch}")
    manifest = _publish(store, manifest, relpath, run_id, takeover)
    if manifest.snapshot == relpath:  # ours, not a rival's that was published first
        selection.report(store, epoch, chosen, lease, run_id)
        selection.warn_duplicates(epoch, manifest.duplicates, chosen, duplicates_expected,
                                  lease is not None)
    retention.retain(store, manifest, started)
    return manifest


def _refuse_other_manifest(store: StoreReader, manifest: Manifest, run_id: str | None,
                           takeover: bool) -> None:
    """OwnershipError when another run committed ``manifest`` (unless ``takeover``)."""
    if not takeover:
        runs.refuse_other_run(store.url, runs.manifest_owner(manifest), run_id)


def _recommit(store: StoreReader, epoch: int, latest: int, run_id: str | None, takeover: bool,
              started: float) -> Manifest:
    """An epoch already committed: write nothing; for the latest, finish an interrupted
    clean-up (a committing process that died in retention)."""
    manifest = store.manifest(latest)
    if epoch < latest:
        return store.manifest(epoch) if epoch in store.epochs else manifest
    _refuse_other_manifest(store, manifest, run_id, takeover)
    retention.retain(store, manifest, started)
    return manifest


def _write_snapshot(store: StoreReader, epoch: int, previous: ScoreSnapshot, relpath: str,
                    latest: int | None, lease: RunLease | None,
                    run_id: str | None) -> tuple[Manifest, selection.Selection]:
    """Merge and upload the snapshot of ``epoch`` to ``relpath``; return the manifest to commit."""
    delta_names = store.pending_deltas(epoch)
    # Work next to where the snapshot ends up, so that moving it there is a rename.
    work_parent = store.local_root or store.cache_directory()
    try:
        os.makedirs(work_parent, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=fsio.COMMIT_DIR_PREFIX, dir=work_parent,
                                         ignore_cleanup_errors=True) as work:
            live = fsio.hold_work_directory(work)  # retention elsewhere leaves a live commit alone
            try:
                chosen = selection.select_deltas(store, epoch, delta_names, work, latest, lease,
                                                 run_id)
                return _merge(store, epoch, previous, chosen, work, relpath, lease, run_id), chosen
            finally:
                os.close(live)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        advice = ("The disk that holds the store is full (a commit writes the new snapshot "
                  "next to the old ones): free space there" if store.local_root is not None
                  else cache_full_advice(work_parent) + " (a commit of a remote store works there)")
        raise StorageFullError(store.url, getattr(exc, "filename", None) or work_parent, advice,
                               exc) from exc


def _merge(store: StoreReader, epoch: int, previous: ScoreSnapshot, chosen: selection.Selection,
           work: str, relpath: str, lease: RunLease | None, run_id: str | None) -> Manifest:
    local_out = os.path.join(work, "snapshot.arrow")
    result = merge_snapshot(previous, chosen.deltas, epoch, local_out)
    chosen.deltas = []  # unmapped: the inputs are no longer needed
    manifest = Manifest(
        epoch=epoch, snapshot=relpath, snapshot_bytes=os.path.getsize(local_out),
        snapshot_xxh3=result.digest, keys=result.rows,
        mean=result.score_sum / result.rows if result.rows else None,
        score_sum=result.score_sum, updated=result.updated, new_keys=result.new_keys,
        duplicates=result.duplicates, rejected_nonfinite=result.rejected_nonfinite,
        deltas=tuple(chosen.merged), run_id=run_id, created_at=now(),
        incarnation=None if lease is None else lease.incarnation,
    )
    try:  # never publish what the store's own reader would refuse
        Manifest.from_json(manifest.to_json())
    except ValueError as exc:
        raise CorruptStoreError(store.files.path(layout.manifest_name(epoch)),
                                f"the commit would write a manifest whose {exc}; not written",
                                epoch - 1 if epoch else None) from None
    try:
        store.files.upload(local_out, relpath)
    except FileExistsError:
        # The name is this commit's own (a fresh uuid): a retried upload whose first reply
        # was lost. S3 makes a PUT visible whole, so the right size means it is complete.
        if store.files.size(relpath) != manifest.snapshot_bytes:
            raise
    if store.local_root is None:  # the committing machine need not download it again
        os.replace(local_out, os.path.join(os.path.dirname(work), relpath.rsplit("/", 1)[-1]))
    return manifest


def _publish(store: StoreReader, manifest: Manifest, relpath: str, run_id: str | None,
             takeover: bool) -> Manifest:
    """Write the manifest last, exclusively; if another process committed first, its stands."""
    try:
        store.files.write_new(layout.manifest_name(manifest.epoch), manifest.to_json(),
                              exclusive=True)
    except FileExistsError:
        existing = store.manifest(manifest.epoch)
        if existing.snapshot != relpath:
            # Another process committed this epoch first: its manifest stands, ours is an orphan.
            store.files.remove(relpath)
            _refuse_other_manifest(store, existing, run_id, takeover)
            return existing
        return existing  # ours: a retried create whose first reply was lost
    return manifest

"""The commit protocol: an epoch's deltas + the previous snapshot -> the next epoch.

As Delta Lake and Iceberg commit: ranks flush immutable delta files; ``commit_epoch``
merges the snapshot of ``e-1`` with every delta of ``e`` present at that moment into a new
snapshot file, uploads it under a fresh name, then writes ``manifests/epoch-<e>.json`` last,
with an exclusive create. A reader sees either epoch ``e-1`` or ``e``, never a mix; a crash
anywhere loses at most the unflushed updates of the uncommitted epoch. Retention runs after.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid

from . import fsio, layout, retention
from .checks import first_names
from .errors import CorruptStoreError, OwnershipError, StoreError
from .files import now
from .layout import Manifest
from .merge import merge_snapshot, open_delta
from .reader import StoreReader
from .snapshot import ScoreSnapshot
from .tables import TableFile

log = logging.getLogger(__name__)


def check_owner(url: str, manifest: Manifest | None, run_id: str | None, takeover: bool) -> None:
    """Refuse a run that is not the one which committed the store's latest epoch.

    A store that was never committed with a run id (plain use) belongs to nobody.
    """
    if manifest is None or manifest.run_id is None or manifest.run_id == run_id or takeover:
        return
    raise OwnershipError(
        f"{url} belongs to run {manifest.run_id!r} (it committed epoch {manifest.epoch} at "
        f"{manifest.created_at}); this run is {run_id!r}. Two jobs must not share a store: use "
        f"another store URL, or continue that run with run_id={manifest.run_id!r} (it travels in "
        f"InfoBatch.state_dict()), or take the store over deliberately with takeover=True"
    )


def commit_epoch(store: StoreReader, epoch: int, run_id: str | None, takeover: bool,
                 duplicates_expected: bool = False) -> Manifest:
    """``ScoreStore.commit``: see there for the semantics."""
    started = time.time()
    layout.check_epoch(epoch)
    store.files.ensure_marker(creating=True)
    latest = store.latest_epoch
    if latest is not None and epoch <= latest:
        return _recommit(store, epoch, latest, run_id, takeover, started)
    expected = 0 if latest is None else latest + 1
    if epoch != expected:
        raise StoreError(
            f"{store.url}: cannot commit epoch {epoch}; the latest committed epoch is {latest}, "
            f"so the next commit must be epoch {expected} (epochs commit in order)"
        )
    check_owner(store.url, store.manifest(latest) if latest is not None else None, run_id, takeover)
    previous = store.snapshot(latest) if latest is not None else ScoreSnapshot.empty()
    relpath = layout.snapshot_name(epoch, uuid.uuid4().hex)
    try:
        manifest = _write_snapshot(store, epoch, previous, relpath, latest, run_id)
    except FileNotFoundError:
        # A delta listed a moment ago is gone: another process committed this epoch
        # meanwhile and its retention removed it. Its manifest stands.
        if epoch not in store.epochs:
            raise
        existing = store.manifest(epoch)
        check_owner(store.url, existing, run_id, takeover)
        return existing
    manifest = _publish(store, manifest, relpath, run_id, takeover)
    if manifest.duplicates and not duplicates_expected:
        log.warning(
            "epoch %d: %d updates hit a key already updated in this epoch: keys collide "
            "(use a shard-qualified key), a crashed attempt's deltas were merged, or the "
            "shards are resampled (resampled=True draws samples more than once; then give the "
            "stage its epoch length, ib.stage(epoch_samples=n), which also makes pruning save "
            "compute)", epoch, manifest.duplicates)
    retention.retain(store, manifest, started)
    return manifest


def _recommit(store: StoreReader, epoch: int, latest: int, run_id: str | None, takeover: bool,
              started: float) -> Manifest:
    """An epoch already committed: write nothing; for the latest, finish an interrupted
    clean-up (a committing process that died in retention)."""
    manifest = store.manifest(latest)
    check_owner(store.url, manifest, run_id, takeover)
    if epoch < latest:
        return store.manifest(epoch) if epoch in store.epochs else manifest
    retention.retain(store, manifest, started)
    return manifest


def _write_snapshot(store: StoreReader, epoch: int, previous: ScoreSnapshot, relpath: str,
                    latest: int | None, run_id: str | None) -> Manifest:
    """Merge and upload the snapshot of ``epoch`` to ``relpath``; return the manifest to commit."""
    delta_names = store.pending_deltas(epoch)
    # Work next to where the snapshot ends up, so that moving it there is a rename.
    work_parent = store.local_root or store.cache_directory()
    os.makedirs(work_parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=fsio.COMMIT_DIR_PREFIX, dir=work_parent,
                                     ignore_cleanup_errors=True) as work:
        live = fsio.hold_work_directory(work)  # retention elsewhere leaves a live commit alone
        try:
            return _merge(store, epoch, previous, delta_names, work, relpath, latest, run_id)
        finally:
            os.close(live)


def _merge(store: StoreReader, epoch: int, previous: ScoreSnapshot, delta_names: list[str],
           work: str, relpath: str, latest: int | None, run_id: str | None) -> Manifest:
    deltas, merged = _own_deltas(store, epoch, delta_names, work, latest, run_id)
    local_out = os.path.join(work, "snapshot.arrow")
    result = merge_snapshot(previous, deltas, epoch, local_out)
    del deltas
    manifest = Manifest(
        epoch=epoch, snapshot=relpath, snapshot_bytes=os.path.getsize(local_out),
        snapshot_xxh3=result.digest, keys=result.rows,
        mean=result.score_sum / result.rows if result.rows else None,
        score_sum=result.score_sum, updated=result.updated, new_keys=result.new_keys,
        duplicates=result.duplicates, rejected_nonfinite=result.rejected_nonfinite,
        deltas=tuple(merged), run_id=run_id, created_at=now(),
    )
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


def _own_deltas(store: StoreReader, epoch: int, names: list[str], work: str,
                latest: int | None, run_id: str | None) -> tuple[list[TableFile], list[str]]:
    """The deltas this run's commit merges (its own and untagged ones), opened and checked."""
    deltas, merged, foreign = [], [], []
    for name in names:
        delta = _open_delta(store, name, epoch, work, latest)
        writer_run = delta.meta.get("run_id")
        if run_id is not None and writer_run is not None and writer_run != run_id:
            foreign.append(f"{name} (run {writer_run!r})")
            continue
        deltas.append(delta)
        merged.append(name)
    if foreign:
        log.warning("%s: epoch %d: %d delta file(s) written by another run are not merged "
                    "into run %r's commit: %s", store.url, epoch, len(foreign), run_id,
                    first_names(foreign))
    return deltas, merged


def _open_delta(store: StoreReader, name: str, epoch: int, work: str, latest: int | None) -> TableFile:
    local = None
    try:
        local = store.files.local_copy(name, work)
        return open_delta(local, epoch)
    except ValueError as exc:
        if local is not None and not os.path.lexists(local):  # removed while being opened
            raise FileNotFoundError(store.files.path(name)) from None
        raise CorruptStoreError(store.files.path(name), f"delta {exc}", latest) from None


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
            check_owner(store.url, existing, run_id, takeover)
            return existing
        return existing  # ours: a retried create whose first reply was lost
    return manifest

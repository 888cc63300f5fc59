"""Retention: what a commit leaves in the store, and what it removes after itself.

After every successful commit (and the no-op re-commit of the latest epoch, which finishes
the clean-up of a commit killed after its manifest) the store keeps the marker, the last
``keep_snapshots`` manifests and the snapshots they name, and removes:

- every delta of a committed epoch: merged ones, and, reported, those no commit merged
  (flushed after their epoch's commit, or by another run);
- the manifests of older epochs (each before its snapshot: a manifest never names a
  missing file), and snapshots no retained manifest names (a losing or killed commit's);
- run records (``runs/``) beyond the newest few; never the newest, the store's owner;
- on a local disk, the temporaries of killed writes and commits (an object store makes a
  PUT visible whole and has none); for a remote store, the committing machine's cache.

Every file removed is one no reader can be using: it belongs to no retained epoch. Only
files inside the store's root go: ``StoreFiles`` refuses a folder that is a link, and a
file that is a link is removed itself, never its target.
"""

from __future__ import annotations

import logging
import os

from . import cache, fsio, layout, runs
from .checks import first_names
from .errors import StoreError
from .layout import Manifest
from .reader import StoreReader

log = logging.getLogger(__name__)


def retain(store: StoreReader, manifest: Manifest, started: float) -> None:
    """After a commit: drop the deltas of committed epochs, old epochs beyond
    ``keep_snapshots``, orphaned snapshots and the stale temporaries of killed steps."""
    epochs = store.epochs
    keep = epochs[-store.keep_snapshots:]
    retained = {}
    for epoch in keep:
        try:
            retained[epoch] = store.manifest(epoch)
        except StoreError:
            return  # leave clean-up to a later commit rather than guess
    _remove_committed_deltas(store, manifest.epoch, retained, started)
    for epoch in epochs:
        if epoch not in retained:
            # The manifest goes first: a manifest never names a missing snapshot.
            store.files.remove(layout.manifest_name(epoch))
    referenced = {m.snapshot for m in retained.values()}
    for name in store.files.list(layout.SNAPSHOTS):
        relpath = f"{layout.SNAPSHOTS}/{name}"
        file_epoch = layout.snapshot_epoch(relpath)
        if file_epoch is not None and file_epoch <= manifest.epoch and relpath not in referenced:
            store.files.remove(relpath)
    runs.prune_records(store.files)
    if store.local_root is not None:
        # Killed writes and commits leave temporaries only on a local disk (an object
        # store makes a PUT visible whole); none of this job's own is live now.
        for directory in ("", layout.SNAPSHOTS, layout.MANIFESTS, layout.RUNS):
            store.files.check_folders(directory)
            fsio.sweep_temporaries(os.path.join(store.root, directory), started)
    else:
        cache.evict(store.cache_directory(), {r.rsplit("/", 1)[-1] for r in referenced}, before=started)


def _remove_committed_deltas(store: StoreReader, committed: int,
                             retained: dict[int, Manifest], started: float) -> None:
    """Remove every delta of an epoch up to ``committed``: merged ones, and, reported,
    those that no commit merged (flushed after their epoch's commit, or by another run)."""
    merged = {name for m in retained.values() for name in m.deltas}
    for dirname in store.files.list(layout.DELTAS):
        epoch = layout.delta_dir_epoch(dirname)
        if epoch is None or epoch > committed:
            continue  # a later epoch's deltas: pending
        names = store.pending_deltas(epoch)
        unmerged = [n for n in names if n not in merged]
        if unmerged and epoch in retained:
            log.warning(
                "%s: %d delta file(s) of epoch %d were never merged (flushed after the epoch "
                "was committed, or by another run); removing them: %s", store.url,
                len(unmerged), epoch, first_names(unmerged))
        for name in names:
            store.files.remove(name)
        if store.local_root is not None:
            store.files.check_folders(f"{layout.DELTAS}/{dirname}")  # never sweep through a link
            directory = os.path.join(store.root, layout.DELTAS, dirname)
            fsio.sweep_temporaries(directory, started)  # flushes killed before their rename
            try:  # object stores have no directories; a local one would stay behind, empty
                os.rmdir(directory)
            except OSError:
                pass

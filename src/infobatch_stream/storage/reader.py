"""StoreReader: what a process that only reads a store sees (DataLoader workers, the CLI).

A reader lists ``manifests/`` and opens the snapshot the newest manifest names, checked
against the size and checksum the manifest records; it sees one whole epoch, never a mix.
An epoch that retention retires while it is being opened is not an error: the reader opens
the newer one. Remote snapshots are fetched into the machine's cache once and mapped there.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from . import cache, layout
from .checks import check_int
from .errors import CorruptStoreError, RetiredEpochError, StoreError
from .files import OutsideRootError, StoreFiles
from .layout import Manifest
from .retry import RetryPolicy
from .snapshot import ScoreSnapshot

log = logging.getLogger(__name__)
_RELIST = 5  # times a reader looks again when retention retires the epoch it was opening


class _Retired(Exception):
    """The epoch being opened was retired by retention (its manifest is gone)."""


class StoreReader:
    """The read side of a ``ScoreStore``: epochs, manifests, snapshots and pending deltas."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None,
                 cache_dir: str | None = None, *, keep_snapshots: int = 3,
                 retries: RetryPolicy | int | None = None):
        self.keep_snapshots = check_int(keep_snapshots, "keep_snapshots", 1, numpy=False)
        self.retries = RetryPolicy.of(retries)
        self.url = os.fspath(url) if isinstance(url, os.PathLike) else url
        self.storage_options = dict(storage_options or {})
        self.cache_dir = cache_dir or cache.default_cache_dir()
        self.files = StoreFiles(self.url, self.storage_options, self.retries, self.cache_dir)
        self.root = self.files.root
        self.local_root = self.files.local_root
        self._snapshots: dict[int, ScoreSnapshot] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    @property
    def fs(self):
        """This process's fsspec filesystem of the store."""
        return self.files.fs

    # Pickled into DataLoader workers: the filesystem object is rebuilt there, not shipped.
    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage_options": self.storage_options,
                "cache_dir": self.cache_dir, "keep_snapshots": self.keep_snapshots,
                "retries": self.retries}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"], state["cache_dir"],
                      keep_snapshots=state["keep_snapshots"], retries=state.get("retries"))

    def cache_directory(self) -> str:
        """This machine's cache directory for the snapshots of this store."""
        return cache.store_cache_dir(self.cache_dir, self.fs, self.root)

    # -- epochs and manifests ---------------------------------------------------------------

    @property
    def epochs(self) -> list[int]:
        """The committed epochs still retained in the store, oldest first.

        A file in ``manifests/`` that reads like a manifest but is not named as the store
        names them (non-ASCII digits, a trailing newline) is CorruptStoreError, never an epoch.
        """
        epochs, odd = self._listed_epochs()
        if odd:
            raise CorruptStoreError(
                self.files.path(f"{layout.MANIFESTS}/{odd[0]}"),
                f"is not a manifest name the store writes ({odd[0]!r}; manifests are named "
                f"epoch-<8 ASCII digits>.json): a foreign or damaged file, remove it",
                self._last_good_of(epochs))
        return epochs

    def _listed_epochs(self) -> tuple[list[int], list[str]]:
        """(committed epochs, names in ``manifests/`` that only look like manifests)."""
        self.files.ensure_marker(creating=False)
        names = self.files.list(layout.MANIFESTS)
        epochs = sorted(e for e in map(layout.manifest_epoch, names) if e is not None)
        return epochs, [n for n in names if layout.looks_like_a_manifest(n)]

    @property
    def latest_epoch(self) -> int | None:
        """The newest committed epoch; None when nothing is committed yet."""
        epochs = self.epochs
        return epochs[-1] if epochs else None

    def manifest(self, epoch: int | None = None) -> Manifest | None:
        """The manifest of ``epoch`` (default: the latest); None when nothing is committed."""
        if epoch is None:
            for _ in range(_RELIST):
                latest = self.latest_epoch
                if latest is None:
                    return None
                try:
                    return self._read_manifest(latest)
                except FileNotFoundError:
                    continue  # retired by a commit between the listing and the read: list again
            raise StoreError(f"{self.url}: epochs were retired faster than the latest one could "
                             f"be read ({_RELIST} tries)")
        try:
            return self._read_manifest(layout.check_epoch(epoch))
        except FileNotFoundError:
            retained = self.epochs
            error = RetiredEpochError if retained and epoch < retained[-1] else StoreError
            raise error(f"{self.files.path(layout.manifest_name(epoch))}: epoch {epoch} is "
                        f"not committed in this store (retained epochs: {retained})") from None

    def _read_manifest(self, epoch: int) -> Manifest:
        """The manifest of ``epoch``, checked; FileNotFoundError when there is none."""
        relpath = layout.manifest_name(epoch)
        try:
            manifest = Manifest.from_json(self.files.read(relpath))
        except (IsADirectoryError, FileNotFoundError) as exc:
            # A folder where the manifest should be: a local read raises IsADirectoryError; an
            # object store reads a prefix as missing, so only there is a folder looked for.
            if isinstance(exc, FileNotFoundError) and (
                    self.local_root is not None or not self.files.is_folder(relpath)):
                raise
            raise CorruptStoreError(self.files.path(relpath), "is a directory, not a manifest file",
                                    self.last_good_epoch(epoch)) from None
        except ValueError as exc:
            raise CorruptStoreError(self.files.path(relpath), f"manifest {exc}",
                                    self.last_good_epoch(epoch)) from None
        if manifest.epoch != epoch:
            raise CorruptStoreError(self.files.path(relpath),
                                    f"manifest describes epoch {manifest.epoch}", self.last_good_epoch(epoch))
        return manifest

    # -- snapshots --------------------------------------------------------------------------

    def snapshot(self, epoch: int | None = None) -> ScoreSnapshot:
        """The snapshot of ``epoch`` (default: the latest committed one).

        An empty store gives an empty snapshot (no keys, ``mean`` None). Without ``epoch``,
        an epoch retired while being opened makes the reader open the newer one.
        """
        for _ in range(_RELIST):
            manifest = self.manifest(epoch)
            if manifest is None:
                return ScoreSnapshot.empty()
            cached = self._snapshots.get(manifest.epoch)
            if cached is not None and cached.digest == manifest.snapshot_xxh3:
                return cached
            try:
                snap = self._open_snapshot(manifest)
            except _Retired:
                if epoch is None:
                    continue  # a newer epoch was committed meanwhile: open that one
                raise RetiredEpochError(f"{self.url}: epoch {epoch} was retired (keep_snapshots="
                                 f"{self.keep_snapshots}) while it was being opened; retained "
                                 f"epochs: {self.epochs}") from None
            self._snapshots = {manifest.epoch: snap}  # hold one: older epochs are rarely asked again
            return snap
        raise StoreError(f"{self.url}: epochs were retired faster than the latest one could be "
                         f"opened ({_RELIST} tries)")

    def _verified(self, manifest: Manifest, path: str) -> ScoreSnapshot:
        """Open the local snapshot file ``path``; ValueError unless it is what ``manifest`` names."""
        self.files.check_inside(path)
        size = os.path.getsize(path)
        if size != manifest.snapshot_bytes:
            raise ValueError(f"is {size} bytes, its manifest says {manifest.snapshot_bytes}")
        snap = ScoreSnapshot.open(path, manifest.epoch)
        if snap.digest != manifest.snapshot_xxh3:
            raise ValueError("is not the file its manifest names (checksum differs)")
        if snap.mean != manifest.mean:  # the checksum covers the columns, not the metadata
            raise ValueError(f"has mean {snap.mean}, its manifest says {manifest.mean}")
        return snap

    def _open_snapshot(self, manifest: Manifest, *, quiet: bool = False) -> ScoreSnapshot:
        remote = self.files.path(manifest.snapshot)
        try:
            try:
                return self._verified(manifest, self._local_snapshot(manifest))
            except (ValueError, FileNotFoundError) as exc:
                if self.local_root is not None or isinstance(exc, OutsideRootError):
                    raise
                return self._fetch_again(manifest, exc)
        except FileNotFoundError:
            if manifest.epoch not in self._listed_epochs()[0]:
                raise _Retired() from None
            problem = f"snapshot named by {layout.manifest_name(manifest.epoch)} is missing"
        except ValueError as exc:
            problem = f"snapshot {exc}"
        if quiet:
            raise ValueError(problem)
        raise CorruptStoreError(remote, problem, self.last_good_epoch(manifest.epoch))

    def _fetch_again(self, manifest: Manifest, exc: Exception) -> ScoreSnapshot:
        """The cached copy may be what is damaged (a disk error, a stray write) or gone (evicted
        by another process meanwhile), not the remote file: fetch it once more; a second
        failure is the remote's."""
        cached = os.path.join(self.cache_directory(), manifest.snapshot.rsplit("/", 1)[-1])
        try:
            inode = os.stat(cached).st_ino
        except FileNotFoundError:
            inode = None
        if isinstance(exc, ValueError):
            log.warning("%s: the cached copy %s %s; downloading it again",
                        self.files.path(manifest.snapshot), cached, exc)
        return self._verified(manifest, self._local_snapshot(manifest, replace_inode=inode))

    def _local_snapshot(self, manifest: Manifest, replace_inode: int | None = None) -> str:
        if self.local_root is not None:
            return self.files.path(manifest.snapshot)
        directory = self.cache_directory()
        remote = self.files.path(manifest.snapshot)
        path, downloaded = self.files.io("download", remote, cache.fetch, self.fs, remote,
                                         directory, manifest.snapshot_bytes,
                                         replace_inode=replace_inode)
        if downloaded:  # this machine's cache stays bounded, whether or not it commits
            cache.evict_older(directory, manifest.epoch, self.keep_snapshots)
        return path

    def last_good_epoch(self, before: int | None = None) -> int | None:
        """The newest epoch (older than ``before``) whose manifest and snapshot verify."""
        return self._last_good_of([e for e in self._listed_epochs()[0]
                                   if before is None or e < before])

    def _last_good_of(self, epochs: list[int]) -> int | None:
        for epoch in reversed(epochs):
            try:
                manifest = Manifest.from_json(self.files.read(layout.manifest_name(epoch)))
                self._open_snapshot(manifest, quiet=True)
                return epoch
            except (ValueError, OSError, _Retired):
                continue
        return None

    # -- deltas -----------------------------------------------------------------------------

    def pending_deltas(self, epoch: int) -> list[str]:
        """Delta files of ``epoch`` in the store (paths relative to the root), in merge order."""
        directory = layout.delta_dir(layout.check_epoch(epoch))
        names = self.files.list(directory)
        return layout.in_merge_order(
            [f"{directory}/{n}" for n in names if layout.is_delta_name(f"{directory}/{n}", epoch)])

    def leftover_deltas(self) -> dict[int, list[str]]:
        """Delta files of committed epochs still in the store, by epoch.

        Merged deltas whose clean-up was interrupted, and deltas flushed after their epoch was
        committed (or by another run), which no commit merges. Retention after the next
        commit removes them, reporting the never-merged ones.
        """
        latest = self.latest_epoch
        out: dict[int, list[str]] = {}
        if latest is None:
            return out
        for name in self.files.list(layout.DELTAS):
            epoch = layout.delta_dir_epoch(name)
            if epoch is not None and epoch <= latest:
                found = self.pending_deltas(epoch)
                if found:
                    out[epoch] = found
        return out


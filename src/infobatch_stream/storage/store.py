"""ScoreStore: the persistent table of every sample's last loss, on any fsspec URL.

Commit protocol (as Delta Lake and Iceberg commit): ranks flush immutable delta files;
``commit(e)`` merges the snapshot of ``e-1`` with every delta of ``e`` present at that
moment into a new snapshot file, then writes ``manifests/epoch-<e>.json`` last, with an
exclusive create. A reader lists ``manifests/`` and sees either epoch ``e-1`` or ``e``,
never a mix; a crash anywhere loses at most the unflushed updates of the uncommitted epoch.
"""

from __future__ import annotations

import datetime
import logging
import os
import tempfile
import time
import uuid
from typing import Any, Callable, TypeVar

from . import cache, fsio, layout, retention
from .errors import CorruptStoreError, NotAStoreError, OwnershipError, StoreError
from .layout import Manifest
from .merge import merge_snapshot, open_delta
from .retry import RetryPolicy, with_retries
from .snapshot import ScoreSnapshot
from .writer import DeltaWriter

log = logging.getLogger(__name__)
T = TypeVar("T")
_RELIST = 5  # times a reader looks again when retention retires the epoch it was opening


class _Retired(Exception):
    """The epoch being opened was retired by retention (its manifest is gone)."""


class _Outside(ValueError):
    """A local file of the store is a symbolic link that leads outside the store's root."""

    def __init__(self) -> None:
        super().__init__("is a symbolic link that leads outside the store's root")


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


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class ScoreStore:
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
                 retries: "RetryPolicy | int | None" = None):
        if isinstance(keep_snapshots, bool) or not isinstance(keep_snapshots, int) or keep_snapshots < 1:
            raise ValueError(f"keep_snapshots must be an int >= 1, got {keep_snapshots!r}")
        self.retries = RetryPolicy.of(retries)
        self.url = os.fspath(url) if isinstance(url, os.PathLike) else url
        self.storage_options = dict(storage_options or {})
        self._fs, self.root = fsio.open_fs(self.url, self.storage_options)
        self._fs_pid = os.getpid()
        self.local_root = fsio.local_path(self._fs, self.root)
        self.cache_dir = cache_dir or cache.default_cache_dir()
        self.keep_snapshots = keep_snapshots
        self._snapshots: dict[int, ScoreSnapshot] = {}
        self._marker_ok = False

    def __repr__(self) -> str:
        return f"ScoreStore({self.url!r})"

    @property
    def fs(self):
        """This process's filesystem object: a forked DataLoader worker must not use its
        parent's (s3fs's event loop is not fork-safe), so a new process opens its own."""
        if self._fs_pid != os.getpid():
            self._fs, _ = fsio.open_fs(self.url, self.storage_options)
            self._fs_pid = os.getpid()
        return self._fs

    # Pickled into DataLoader workers: the filesystem object is rebuilt there, not shipped.
    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage_options": self.storage_options,
                "cache_dir": self.cache_dir, "keep_snapshots": self.keep_snapshots,
                "retries": self.retries}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"], state["cache_dir"],
                      keep_snapshots=state["keep_snapshots"], retries=state.get("retries"))

    # -- paths and raw files ------------------------------------------------------------

    def _path(self, relpath: str) -> str:
        return fsio.join(self.root, relpath)

    def _io(self, action: str, path: str, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One storage step, retried on transient failures (see ``retry.with_retries``)."""
        return with_retries(self.retries, self.url, action, path, func, *args, **kwargs)

    def _check_inside(self, path: str) -> None:
        """Refuse a local file of the store that is a symbolic link leading out of its root."""
        if self.local_root is not None and not fsio.inside_root(self.root, path):
            raise _Outside()

    def _read_file(self, path: str) -> bytes:
        """A whole file of the store, read fresh; never through a link out of the root."""
        self._check_inside(path)
        return self._io("read", path, fsio.read_bytes, self.fs, path)

    def _read_marker(self) -> bytes | None:
        path = self._path(layout.MARKER)
        try:
            return self._read_file(path)
        except (FileNotFoundError, NotADirectoryError):  # the latter: the URL is a local file
            return None
        except IsADirectoryError:
            raise NotAStoreError(
                f"{self.url}: {layout.MARKER} is a directory; this is not a score store") from None
        except _Outside as exc:
            raise NotAStoreError(f"{path}: {exc}; this is not a score store") from None

    def _check_marker(self, creating: bool) -> None:
        """Refuse a URL that holds something other than a store; create the marker on first write."""
        if self._marker_ok:
            return
        raw = self._read_marker()
        if raw is None:
            if self._io("check", self.root, self.fs.isfile, self.root):
                raise NotAStoreError(f"{self.url} is a file, not a score store; pass a directory or prefix")
            # The marker may appear meanwhile: another rank creating the store writes it before
            # anything else, so files listed now with no marker read *after* the listing are
            # not a store's.
            found = [n for n in self._list(self.root) if n != layout.MARKER]
            if found:
                raw = self._read_marker()
            if found and raw is None:
                shown = ", ".join(found[:5]) + (" ..." if len(found) > 5 else "")
                raise NotAStoreError(
                    f"{self.url} holds other files ({shown}) and no {layout.MARKER}; it is not a "
                    f"score store. Point the store at a new, empty directory or prefix"
                )
        if raw is None:
            if not creating:
                return  # an empty store; checked again once something is written
            try:
                self._io("create", self._path(layout.MARKER), fsio.write_bytes, self.fs,
                         self._path(layout.MARKER), layout.marker_json(_now()), exclusive=True)
            except FileExistsError:
                pass  # another rank created it first (or a retry found our own)
            raw = self._read_marker()
        try:
            layout.check_marker(raw or b"")
        except ValueError as exc:
            raise NotAStoreError(
                f"{self._path(layout.MARKER)}: {exc}. This URL holds a store of another format or "
                f"version; use a new URL for this run"
            ) from None
        self._marker_ok = True

    def _write_new(self, relpath: str, data: bytes) -> None:
        self._check_marker(creating=True)
        self._io("write", self._path(relpath), fsio.write_bytes, self.fs, self._path(relpath), data)

    def _list(self, directory: str) -> list[str]:
        return self._io("list", directory, fsio.list_names, self.fs, directory)

    def _remove(self, relpath: str) -> None:
        self._io("delete", self._path(relpath), fsio.remove, self.fs, self._path(relpath))

    # -- reading --------------------------------------------------------------------------

    @property
    def exists(self) -> bool:
        """Whether a store has been created at this URL (False for an empty or missing location)."""
        return self._read_marker() is not None

    @property
    def epochs(self) -> list[int]:
        """The committed epochs still retained in the store, oldest first."""
        self._check_marker(creating=False)
        names = self._list(self._path(layout.MANIFESTS))
        return sorted(e for e in map(layout.manifest_epoch, names) if e is not None)

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
            raise StoreError(f"{self._path(layout.manifest_name(epoch))}: epoch {epoch} is not "
                             f"committed in this store (retained epochs: {self.epochs})") from None

    def _read_manifest(self, epoch: int) -> Manifest:
        """The manifest of ``epoch``, checked; FileNotFoundError when there is none."""
        path = self._path(layout.manifest_name(epoch))
        try:
            manifest = Manifest.from_json(self._read_file(path))
        except ValueError as exc:
            raise CorruptStoreError(path, f"manifest {exc}", self._last_good(epoch)) from None
        if manifest.epoch != epoch:
            raise CorruptStoreError(path, f"manifest describes epoch {manifest.epoch}",
                                    self._last_good(epoch))
        return manifest

    def snapshot(self, epoch: int | None = None) -> ScoreSnapshot:
        """The snapshot of ``epoch`` (default: the latest committed one).

        An empty store gives an empty snapshot (no keys, ``mean`` None).
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
                raise StoreError(f"{self.url}: epoch {epoch} was retired (keep_snapshots="
                                 f"{self.keep_snapshots}) while it was being opened; retained "
                                 f"epochs: {self.epochs}") from None
            self._snapshots = {manifest.epoch: snap}  # hold one: older epochs are rarely asked again
            return snap
        raise StoreError(f"{self.url}: epochs were retired faster than the latest one could be "
                         f"opened ({_RELIST} tries)")

    def _verified(self, manifest: Manifest, path: str) -> ScoreSnapshot:
        """Open the local snapshot file ``path``; ValueError unless it is what ``manifest`` names."""
        self._check_inside(path)
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
        remote = self._path(manifest.snapshot)
        try:
            try:
                return self._verified(manifest, self._local_snapshot(manifest))
            except (ValueError, FileNotFoundError) as exc:
                if self.local_root is not None or isinstance(exc, _Outside):
                    raise
                # The cached copy may be what is damaged (a disk error, a stray write) or
                # gone (evicted by another process meanwhile), not the remote file: fetch it
                # once more; a second failure is the remote's.
                cached = os.path.join(cache.store_cache_dir(self.cache_dir, self.fs, self.root),
                                      manifest.snapshot.rsplit("/", 1)[-1])
                try:
                    inode = os.stat(cached).st_ino
                except FileNotFoundError:
                    inode = None
                if isinstance(exc, ValueError):
                    log.warning("%s: the cached copy %s %s; downloading it again", remote,
                                cached, exc)
                path = self._local_snapshot(manifest, replace_inode=inode)
                return self._verified(manifest, path)
        except FileNotFoundError:
            if manifest.epoch not in self.epochs:
                raise _Retired() from None
            problem = f"snapshot named by {layout.manifest_name(manifest.epoch)} is missing"
        except ValueError as exc:
            problem = f"snapshot {exc}"
        if quiet:
            raise ValueError(problem)
        raise CorruptStoreError(remote, problem, self._last_good(manifest.epoch))

    def _local_snapshot(self, manifest: Manifest, replace_inode: int | None = None) -> str:
        if self.local_root is not None:
            return self._path(manifest.snapshot)
        directory = cache.store_cache_dir(self.cache_dir, self.fs, self.root)
        remote = self._path(manifest.snapshot)
        path, downloaded = self._io("download", remote, cache.fetch, self.fs, remote, directory,
                                    manifest.snapshot_bytes, replace_inode=replace_inode)
        if downloaded:  # this machine's cache stays bounded, whether or not it commits
            cache.evict_older(directory, manifest.epoch, self.keep_snapshots)
        return path

    def _last_good(self, before: int) -> int | None:
        """The newest epoch older than ``before`` whose manifest and snapshot verify."""
        for epoch in reversed([e for e in self.epochs if e < before]):
            try:
                manifest = Manifest.from_json(self._read_file(self._path(layout.manifest_name(epoch))))
                self._open_snapshot(manifest, quiet=True)
                return epoch
            except (ValueError, OSError, _Retired):
                continue
        return None

    def pending_deltas(self, epoch: int) -> list[str]:
        """Delta files of ``epoch`` in the store (paths relative to the root), in write order."""
        directory = layout.delta_dir(layout.check_epoch(epoch))
        names = self._list(self._path(directory))
        return [f"{directory}/{n}" for n in names if layout.is_delta_name(f"{directory}/{n}", epoch)]

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
        for name in self._list(self._path(layout.DELTAS)):
            epoch = layout.delta_dir_epoch(name)
            if epoch is not None and epoch <= latest:
                found = self.pending_deltas(epoch)
                if found:
                    out[epoch] = found
        return out

    # -- writing --------------------------------------------------------------------------

    def writer(self, epoch: int, rank: int = 0, **kwargs: Any) -> DeltaWriter:
        """A DeltaWriter for the updates of ``epoch`` made on ``rank``."""
        return DeltaWriter(self, epoch, rank, **kwargs)

    def commit(self, epoch: int, *, run_id: str | None = None, takeover: bool = False) -> Manifest:
        """Merge every delta of ``epoch`` present now into the snapshot of ``epoch``.

        Epochs commit in order; committing an epoch that is already committed returns its
        manifest and writes nothing; for the latest epoch it finishes the clean-up of an
        earlier commit of it that died after writing its manifest. ``run_id`` is recorded in
        the manifest; a run other than the one that made the latest commit is refused
        (OwnershipError) unless ``takeover``. A commit with a ``run_id`` merges only the
        deltas its own run wrote (and untagged ones): another run's are left out, reported,
        and removed by retention.
        """
        started = time.time()
        layout.check_epoch(epoch)
        self._check_marker(creating=True)
        latest = self.latest_epoch
        if latest is not None and epoch <= latest:
            manifest = self.manifest(latest)
            check_owner(self.url, manifest, run_id, takeover)
            if epoch < latest:
                return self.manifest(epoch) if epoch in self.epochs else manifest
            self._retain(manifest, started)  # a no-op unless a committing process died in _retain
            return manifest
        expected = 0 if latest is None else latest + 1
        if epoch != expected:
            raise StoreError(
                f"{self.url}: cannot commit epoch {epoch}; the latest committed epoch is {latest}, "
                f"so the next commit must be epoch {expected} (epochs commit in order)"
            )
        check_owner(self.url, self.manifest(latest) if latest is not None else None, run_id,
                    takeover)
        previous = self.snapshot(latest) if latest is not None else ScoreSnapshot.empty()
        delta_names = self.pending_deltas(epoch)
        # Work next to where the snapshot ends up, so that moving it there is a rename.
        work_parent = self.local_root or cache.store_cache_dir(self.cache_dir, self.fs, self.root)
        os.makedirs(work_parent, exist_ok=True)
        relpath = layout.snapshot_name(epoch, uuid.uuid4().hex)
        with tempfile.TemporaryDirectory(prefix=fsio.COMMIT_DIR_PREFIX, dir=work_parent,
                                         ignore_cleanup_errors=True) as work:
            live = fsio.hold_work_directory(work)  # retention elsewhere leaves a live commit alone
            try:
                manifest = self._merge(epoch, previous, delta_names, work, relpath, latest, run_id)
            except FileNotFoundError:
                # A delta listed a moment ago is gone: another process committed this epoch
                # meanwhile and its retention removed it. Its manifest stands.
                if epoch not in self.epochs:
                    raise
                existing = self.manifest(epoch)
                check_owner(self.url, existing, run_id, takeover)
                return existing
            finally:
                os.close(live)
        try:
            self._io("create", self._path(layout.manifest_name(epoch)), fsio.write_bytes,
                     self.fs, self._path(layout.manifest_name(epoch)), manifest.to_json(),
                     exclusive=True)
        except FileExistsError:
            existing = self.manifest(epoch)
            if existing.snapshot != relpath:
                # Another process committed this epoch first: its manifest stands, ours is an orphan.
                self._remove(relpath)
                check_owner(self.url, existing, run_id, takeover)
                return existing
            manifest = existing  # ours: a retried create whose first reply was lost
        if manifest.duplicates:
            log.warning(
                "epoch %d: %d updates hit a key already updated in this epoch: keys collide "
                "(use a shard-qualified key) or a crashed attempt's deltas were merged",
                epoch, manifest.duplicates)
        self._retain(manifest, started)
        return manifest

    def _merge(self, epoch: int, previous: ScoreSnapshot, delta_names: list[str], work: str,
               relpath: str, latest: int | None, run_id: str | None) -> Manifest:
        """Write the snapshot of ``epoch`` to ``relpath``; return the manifest to commit."""
        deltas, merged, foreign = [], [], []
        for name in delta_names:
            delta = self._open_delta(name, epoch, work, latest)
            writer_run = delta.meta.get("run_id")
            if run_id is not None and writer_run is not None and writer_run != run_id:
                foreign.append(f"{name} (run {writer_run!r})")
                continue
            deltas.append(delta)
            merged.append(name)
        if foreign:
            log.warning("%s: epoch %d: %d delta file(s) written by another run are not merged "
                        "into run %r's commit: %s", self.url, epoch, len(foreign), run_id,
                        ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else ""))
        local_out = os.path.join(work, "snapshot.arrow")
        result = merge_snapshot(previous, deltas, epoch, local_out)
        del deltas
        manifest = Manifest(
            epoch=epoch, snapshot=relpath, snapshot_bytes=os.path.getsize(local_out),
            snapshot_xxh3=result.digest, keys=result.rows,
            mean=result.score_sum / result.rows if result.rows else None,
            score_sum=result.score_sum, updated=result.updated, new_keys=result.new_keys,
            duplicates=result.duplicates, rejected_nonfinite=result.rejected_nonfinite,
            deltas=tuple(merged), run_id=run_id, created_at=_now(),
        )
        remote = self._path(relpath)
        try:
            self._io("upload", remote, fsio.put_file, self.fs, local_out, remote, exclusive=True)
        except FileExistsError:
            # The name is this commit's own (a fresh uuid): a retried upload whose first reply
            # was lost. S3 makes a PUT visible whole, so the right size means it is complete.
            if self._io("check", remote, self.fs.size, remote) != manifest.snapshot_bytes:
                raise
        if self.local_root is None:  # the committing machine need not download it again
            directory = os.path.dirname(work)
            os.replace(local_out, os.path.join(directory, relpath.rsplit("/", 1)[-1]))
        return manifest

    def _open_delta(self, name: str, epoch: int, work: str, latest: int | None):
        path = self._path(name)
        local = fsio.local_path(self.fs, path)
        try:
            if local is None:
                local = os.path.join(work, name.rsplit("/", 1)[-1])
                self._io("download", path, fsio.get_file, self.fs, path, local)
            else:
                self._check_inside(local)
            return open_delta(local, epoch)
        except ValueError as exc:
            if not os.path.lexists(local):  # removed while being opened, not damaged
                raise FileNotFoundError(path) from None
            raise CorruptStoreError(path, f"delta {exc}", latest) from None

    def _retain(self, manifest: Manifest, started: float) -> None:
        retention.retain(self, manifest, started)

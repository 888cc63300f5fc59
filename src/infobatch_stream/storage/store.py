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
import uuid
from typing import Any

from . import cache, fsio, layout
from .errors import CorruptStoreError, NotAStoreError, OwnershipError, StoreError
from .layout import Manifest
from .merge import merge_snapshot, open_delta
from .snapshot import ScoreSnapshot
from .writer import DeltaWriter

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
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None,
                 cache_dir: str | None = None, *, keep_snapshots: int = 3):
        if isinstance(keep_snapshots, bool) or not isinstance(keep_snapshots, int) or keep_snapshots < 1:
            raise ValueError(f"keep_snapshots must be an int >= 1, got {keep_snapshots!r}")
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
                "cache_dir": self.cache_dir, "keep_snapshots": self.keep_snapshots}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"], state["cache_dir"],
                      keep_snapshots=state["keep_snapshots"])

    # -- paths and raw files ------------------------------------------------------------

    def _path(self, relpath: str) -> str:
        return fsio.join(self.root, relpath)

    def _read_marker(self) -> bytes | None:
        try:
            return fsio.read_bytes(self.fs, self._path(layout.MARKER))
        except (FileNotFoundError, NotADirectoryError):  # the latter: the URL is a local file
            return None
        except IsADirectoryError:
            raise NotAStoreError(
                f"{self.url}: {layout.MARKER} is a directory; this is not a score store") from None

    def _check_marker(self, creating: bool) -> None:
        """Refuse a URL that holds something other than a store; create the marker on first write."""
        if self._marker_ok:
            return
        raw = self._read_marker()
        if raw is None:
            if self.fs.isfile(self.root):
                raise NotAStoreError(f"{self.url} is a file, not a score store; pass a directory or prefix")
            # The marker itself may appear meanwhile: another rank is creating the store.
            found = [n for n in fsio.list_names(self.fs, self.root) if n != layout.MARKER]
            if found:
                shown = ", ".join(found[:5]) + (" ..." if len(found) > 5 else "")
                raise NotAStoreError(
                    f"{self.url} holds other files ({shown}) and no {layout.MARKER}; it is not a "
                    f"score store. Point the store at a new, empty directory or prefix"
                )
            if not creating:
                return  # an empty store; checked again once something is written
            try:
                fsio.write_bytes(self.fs, self._path(layout.MARKER), layout.marker_json(_now()),
                                 exclusive=True)
            except FileExistsError:
                pass  # another rank created it first
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
        fsio.write_bytes(self.fs, self._path(relpath), data)

    # -- reading --------------------------------------------------------------------------

    @property
    def exists(self) -> bool:
        """Whether a store has been created at this URL (False for an empty or missing location)."""
        return self._read_marker() is not None

    @property
    def epochs(self) -> list[int]:
        """The committed epochs still retained in the store, oldest first."""
        self._check_marker(creating=False)
        names = fsio.list_names(self.fs, self._path(layout.MANIFESTS))
        return sorted(e for e in map(layout.manifest_epoch, names) if e is not None)

    @property
    def latest_epoch(self) -> int | None:
        """The newest committed epoch; None when nothing is committed yet."""
        epochs = self.epochs
        return epochs[-1] if epochs else None

    def manifest(self, epoch: int | None = None) -> Manifest | None:
        """The manifest of ``epoch`` (default: the latest); None when nothing is committed."""
        if epoch is None:
            epoch = self.latest_epoch
            if epoch is None:
                return None
        path = self._path(layout.manifest_name(layout.check_epoch(epoch)))
        try:
            raw = fsio.read_bytes(self.fs, path)
        except FileNotFoundError:
            raise StoreError(f"{path}: epoch {epoch} is not committed in this store "
                             f"(retained epochs: {self.epochs})") from None
        try:
            manifest = Manifest.from_json(raw)
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
        manifest = self.manifest(epoch)
        if manifest is None:
            return ScoreSnapshot.empty()
        cached = self._snapshots.get(manifest.epoch)
        if cached is not None and cached.digest == manifest.snapshot_xxh3:
            return cached
        snap = self._open_snapshot(manifest)
        self._snapshots = {manifest.epoch: snap}  # hold one: older epochs are rarely asked again
        return snap

    def _open_snapshot(self, manifest: Manifest, *, quiet: bool = False) -> ScoreSnapshot:
        remote = self._path(manifest.snapshot)
        try:
            path = self._local_snapshot(manifest)
            size = os.path.getsize(path)
            if size != manifest.snapshot_bytes:
                raise ValueError(f"is {size} bytes, its manifest says {manifest.snapshot_bytes}")
            snap = ScoreSnapshot.open(path, manifest.epoch)
            if snap.digest != manifest.snapshot_xxh3:
                raise ValueError("is not the file its manifest names (checksum differs)")
            if snap.mean != manifest.mean:  # the checksum covers the columns, not the metadata
                raise ValueError(f"has mean {snap.mean}, its manifest says {manifest.mean}")
            return snap
        except FileNotFoundError:
            problem = f"snapshot named by {layout.manifest_name(manifest.epoch)} is missing"
        except ValueError as exc:
            problem = f"snapshot {exc}"
        if quiet:
            raise ValueError(problem)
        raise CorruptStoreError(remote, problem, self._last_good(manifest.epoch))

    def _local_snapshot(self, manifest: Manifest) -> str:
        if self.local_root is not None:
            return self._path(manifest.snapshot)
        directory = cache.store_cache_dir(self.cache_dir, self.fs, self.root)
        path = cache.fetch(self.fs, self._path(manifest.snapshot), directory,
                           manifest.snapshot_bytes)
        return path

    def _last_good(self, before: int) -> int | None:
        """The newest epoch older than ``before`` whose manifest and snapshot verify."""
        for epoch in reversed([e for e in self.epochs if e < before]):
            try:
                manifest = Manifest.from_json(
                    fsio.read_bytes(self.fs, self._path(layout.manifest_name(epoch))))
                self._open_snapshot(manifest, quiet=True)
                return epoch
            except (ValueError, OSError):
                continue
        return None

    def pending_deltas(self, epoch: int) -> list[str]:
        """Delta files of ``epoch`` in the store (paths relative to the root), in write order."""
        directory = layout.delta_dir(layout.check_epoch(epoch))
        names = fsio.list_names(self.fs, self._path(directory))
        return [f"{directory}/{n}" for n in names if layout.is_delta_name(f"{directory}/{n}", epoch)]

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
        (OwnershipError) unless ``takeover``.
        """
        layout.check_epoch(epoch)
        self._check_marker(creating=True)
        latest = self.latest_epoch
        if latest is not None and epoch <= latest:
            if epoch < latest:
                return self.manifest(epoch) if epoch in self.epochs else self.manifest(latest)
            manifest = self.manifest(latest)
            self._retain(manifest)  # a no-op unless the committing process died in _retain
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
        with tempfile.TemporaryDirectory(prefix=f"{fsio.TMP_PREFIX}commit-", dir=work_parent) as work:
            deltas = [self._open_delta(name, epoch, work, latest) for name in delta_names]
            relpath = layout.snapshot_name(epoch, uuid.uuid4().hex)
            local_out = os.path.join(work, "snapshot.arrow")
            result = merge_snapshot(previous, deltas, epoch, local_out)
            del deltas
            manifest = Manifest(
                epoch=epoch, snapshot=relpath, snapshot_bytes=os.path.getsize(local_out),
                snapshot_xxh3=result.digest, keys=result.rows,
                mean=result.score_sum / result.rows if result.rows else None,
                score_sum=result.score_sum, updated=result.updated, new_keys=result.new_keys,
                duplicates=result.duplicates, rejected_nonfinite=result.rejected_nonfinite,
                deltas=tuple(delta_names), run_id=run_id, created_at=_now(),
            )
            fsio.put_file(self.fs, local_out, self._path(relpath), exclusive=True)
            if self.local_root is None:  # the committing machine need not download it again
                os.replace(local_out, os.path.join(work_parent, relpath.rsplit("/", 1)[-1]))
        try:
            fsio.write_bytes(self.fs, self._path(layout.manifest_name(epoch)), manifest.to_json(),
                             exclusive=True)
        except FileExistsError:
            # Another process committed this epoch first: its manifest stands, ours is an orphan.
            fsio.remove(self.fs, self._path(relpath))
            return self.manifest(epoch)
        if manifest.duplicates:
            log.warning(
                "epoch %d: %d updates hit a key already updated in this epoch: keys collide "
                "(use a shard-qualified key) or a crashed attempt's deltas were merged",
                epoch, manifest.duplicates)
        self._retain(manifest)
        return manifest

    def _open_delta(self, name: str, epoch: int, work: str, latest: int | None):
        path = self._path(name)
        local = fsio.local_path(self.fs, path)
        try:
            if local is None:
                local = os.path.join(work, name.rsplit("/", 1)[-1])
                fsio.get_file(self.fs, path, local)
            return open_delta(local, epoch)
        except ValueError as exc:
            raise CorruptStoreError(path, f"delta {exc}", latest) from None

    def _retain(self, manifest: Manifest) -> None:
        """After a commit: drop merged deltas, old epochs beyond ``keep_snapshots``, orphans."""
        for name in manifest.deltas:
            fsio.remove(self.fs, self._path(name))
        if self.local_root is not None:
            try:  # object stores have no directories; a local one would stay behind, empty
                os.rmdir(self._path(layout.delta_dir(manifest.epoch)))
            except OSError:
                pass
        epochs = self.epochs
        keep = set(epochs[-self.keep_snapshots:])
        for epoch in epochs:
            if epoch not in keep:
                # The manifest goes first: a manifest never names a missing snapshot.
                fsio.remove(self.fs, self._path(layout.manifest_name(epoch)))
        referenced = set()
        for epoch in keep:
            try:
                referenced.add(self.manifest(epoch).snapshot)
            except StoreError:
                return  # leave clean-up to a later commit rather than guess
        for name in fsio.list_names(self.fs, self._path(layout.SNAPSHOTS)):
            relpath = f"{layout.SNAPSHOTS}/{name}"
            file_epoch = layout.snapshot_epoch(relpath)
            if file_epoch is not None and file_epoch <= manifest.epoch and relpath not in referenced:
                fsio.remove(self.fs, self._path(relpath))
        if self.local_root is None:
            directory = cache.store_cache_dir(self.cache_dir, self.fs, self.root)
            cache.evict(directory, {r.rsplit("/", 1)[-1] for r in referenced})

"""StoreFiles: the one owner of a store's file access.

Every read, write, listing and delete of a store goes through here: paths relative to the
store's root, the retry policy for transient failures, the checks that keep a local store
inside its root (no file read through a symbolic link leading out of it, no folder of it a
link, so that nothing is ever written or deleted elsewhere), the translation of a full disk
into ``StorageFullError``, and the marker that says a URL holds a store. The reader, the
writer, the commit and retention all use this object; none touches the filesystem on its own.
"""

from __future__ import annotations

import datetime
import errno
import os
from collections.abc import Callable
from typing import Any, TypeVar

from . import fsio, layout
from .cache import ENV_CACHE_DIR
from .checks import first_names
from .errors import LinkedFolderError, NotAStoreError, StorageFullError
from .retry import RetryPolicy, with_retries

T = TypeVar("T")


class OutsideRootError(ValueError):
    """A local file of the store is a symbolic link that leads outside the store's root."""

    def __init__(self) -> None:
        super().__init__("is a symbolic link that leads outside the store's root")


def now() -> str:
    """The current UTC time as the store records it (ISO 8601, seconds)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says a disk or a quota is full (pyarrow's errors may carry no errno)."""
    if not isinstance(exc, OSError):
        return False
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "Disk quota exceeded" in text


def cache_full_advice(directory: str) -> str:
    return (f"The disk of the snapshot cache ({directory}) is full: free space there, or set "
            f"${ENV_CACHE_DIR} (or ScoreStore(cache_dir=...)) to a directory on a larger disk")


class StoreFiles:
    """The files of one store at ``url``: relative paths in, bytes and names out.

    >>> files = StoreFiles("/tmp/scores")
    >>> files.list(layout.MANIFESTS)        # doctest: +SKIP
    ['epoch-00000000.json']
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None,
                 retries: RetryPolicy | None = None, cache_dir: str = "the cache directory"):
        self.url = url
        self.cache_dir = cache_dir  # where downloads land: named when that disk is full
        self.storage_options = dict(storage_options or {})
        self.retries = retries or RetryPolicy()
        self._fs, self.root = fsio.open_fs(url, self.storage_options)
        self._fs_pid = os.getpid()
        self.local_root = fsio.local_path(self._fs, self.root)
        self._marker_ok = False

    @property
    def fs(self):
        """This process's filesystem object: a forked DataLoader worker must not use its
        parent's (s3fs's event loop is not fork-safe), so a new process opens its own."""
        if self._fs_pid != os.getpid():
            self._fs, _ = fsio.open_fs(self.url, self.storage_options)
            self._fs_pid = os.getpid()
        return self._fs

    def path(self, relpath: str) -> str:
        """The full path (as the filesystem names it) of a file of the store."""
        return fsio.join(self.root, relpath) if relpath else self.root

    def io(self, action: str, path: str, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One storage step, retried on transient failures (see ``retry.with_retries``).

        A full disk is not transient: ``StorageFullError`` names the store, the file and
        what to do (a download fills this machine's disk, not the store's).
        """
        try:
            return with_retries(self.retries, self.url, action, path, func, *args, **kwargs)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            advice = (cache_full_advice(self.cache_dir) if action == "download"
                      else "The disk (or quota) that holds the store is full: free space there")
            raise StorageFullError(self.url, path, advice, exc) from exc

    def check_inside(self, path: str) -> None:
        """Refuse a local file of the store that is a symbolic link leading out of its root,
        or that lies in a folder of the store that is a link."""
        if self.local_root is None:
            return
        if not fsio.inside_root(self.root, path):
            raise OutsideRootError()
        self.check_folders(os.path.relpath(os.path.dirname(path), self.root))

    def check_folders(self, reldir: str) -> None:
        """Refuse a local folder of the store (``deltas/epoch-00000006``, ...) that is, or lies
        in, a symbolic link: writes and deletes there would land wherever the link points."""
        if self.local_root is None or reldir in ("", "."):
            return
        parts = reldir.split("/")
        for depth in range(1, len(parts) + 1):
            folder = self.path("/".join(parts[:depth]))
            if os.path.islink(folder):
                raise LinkedFolderError(
                    f"{folder} is a symbolic link (to {os.readlink(folder)}): a store's folders "
                    f"must be real directories, since the store writes and deletes only inside "
                    f"its root and never through a link. Move the folder back into the store, or "
                    f"link the store's root instead (a store whose root is a link works)")

    def check_layout(self) -> None:
        """Refuse a local store any of whose folders (or ``deltas/``'s epoch folders) is a link."""
        if self.local_root is None:
            return
        for folder in layout.FOLDERS:
            self.check_folders(folder)
        for name in self.list(layout.DELTAS):
            self.check_folders(f"{layout.DELTAS}/{name}")

    # -- reading ----------------------------------------------------------------------------

    def read(self, relpath: str) -> bytes:
        """A whole file of the store, read fresh; never through a link out of the root."""
        path = self.path(relpath)
        self.check_inside(path)
        return self.io("read", path, fsio.read_bytes, self.fs, path)

    def list(self, reldir: str) -> list[str]:
        """Base names in a directory of the store (empty when it does not exist)."""
        self.check_folders(reldir)
        path = self.path(reldir)
        return self.io("list", path, fsio.list_names, self.fs, path)

    def is_folder(self, relpath: str) -> bool:
        path = self.path(relpath)
        return self.io("check", path, self.fs.isdir, path)

    def local_copy(self, relpath: str, work: str) -> str:
        """A local path holding the file: itself on a local disk, else a download into ``work``."""
        path = self.path(relpath)
        local = fsio.local_path(self.fs, path)
        if local is None:
            local = os.path.join(work, relpath.rsplit("/", 1)[-1])
            self.io("download", path, fsio.get_file, self.fs, path, local)
        else:
            self.check_inside(local)
        return local

    def size(self, relpath: str) -> int:
        path = self.path(relpath)
        return self.io("check", path, self.fs.size, path)

    # -- writing ----------------------------------------------------------------------------

    def write_new(self, relpath: str, data: bytes, *, exclusive: bool = False) -> None:
        """Write a whole new file (atomically); with ``exclusive``, FileExistsError if it exists."""
        self.ensure_marker(creating=True)
        self.check_folders(relpath.rpartition("/")[0])
        path = self.path(relpath)
        self.io("create" if exclusive else "write", path, fsio.write_bytes, self.fs, path, data,
                exclusive=exclusive)

    def upload(self, local: str, relpath: str) -> None:
        """Copy a complete local file to a new file of the store, never replacing one."""
        self.check_folders(relpath.rpartition("/")[0])
        path = self.path(relpath)
        self.io("upload", path, fsio.put_file, self.fs, local, path, exclusive=True)

    def remove(self, relpath: str) -> None:
        """Delete one file of the store; a file that is already gone is not an error.

        Locally only an entry of a real folder inside the root goes (a link is removed
        itself, never what it points to); a directory is never removed.
        """
        self.check_folders(relpath.rpartition("/")[0])
        path = self.path(relpath)
        if self.local_root is not None and not fsio.inside_root(self.root, os.path.dirname(path)):
            raise LinkedFolderError(f"{path}: its folder leads outside the store's root; not removed")
        self.io("delete", path, fsio.remove, self.fs, path)

    # -- the marker -------------------------------------------------------------------------

    def read_marker(self) -> bytes | None:
        """The marker's bytes; None when there is none (an empty or missing location)."""
        try:
            return self.read(layout.MARKER)
        except (FileNotFoundError, NotADirectoryError):  # the latter: the URL is a local file
            return None
        except IsADirectoryError:
            raise NotAStoreError(
                f"{self.url}: {layout.MARKER} is a directory; this is not a score store") from None
        except OutsideRootError as exc:
            raise NotAStoreError(f"{self.path(layout.MARKER)}: {exc}; this is not a score store") \
                from None

    def ensure_marker(self, creating: bool) -> None:
        """Refuse a URL that holds something other than a store; create the marker on first write."""
        if self._marker_ok:
            return
        raw = self.read_marker()
        if raw is None:
            raw = self._check_no_foreign_files()
        if raw is None:
            if not creating:
                return  # an empty store; checked again once something is written
            try:
                self.io("create", self.path(layout.MARKER), fsio.write_bytes, self.fs,
                        self.path(layout.MARKER), layout.marker_json(now()), exclusive=True)
            except FileExistsError:
                pass  # another rank created it first (or a retry found our own)
            raw = self.read_marker()
        try:
            layout.check_marker(raw or b"")
        except ValueError as exc:
            raise NotAStoreError(
                f"{self.path(layout.MARKER)}: {exc}. This URL holds a store of another format "
                f"or version; use a new URL for this run"
            ) from None
        self.check_layout()
        self._marker_ok = True

    def _check_no_foreign_files(self) -> bytes | None:
        """With no marker found: refuse a URL that holds other files; the marker if it appeared."""
        if self.io("check", self.root, self.fs.isfile, self.root):
            raise NotAStoreError(f"{self.url} is a file, not a score store; pass a directory or prefix")
        # The marker may appear meanwhile: another rank creating the store writes it before
        # anything else, so files listed now with no marker read *after* the listing are
        # not a store's.
        found = [n for n in self.list("") if n != layout.MARKER]
        if not found:
            return None
        raw = self.read_marker()
        if raw is None:
            raise NotAStoreError(
                f"{self.url} holds other files ({first_names(found)}) and no {layout.MARKER}; it is "
                f"not a score store. Point the store at a new, empty directory or prefix"
            )
        return raw

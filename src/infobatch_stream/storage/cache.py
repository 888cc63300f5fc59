"""The per-machine cache of remote snapshots: downloaded once, then memory-mapped by everyone.

Every process of a machine (all DataLoader workers of all local ranks) asks for the same
immutable file. The first takes an exclusive lock on ``<name>.lock``, downloads into a
temporary file in the same directory and renames it into place; the others wait on the lock
and then find the whole file there. A crash mid-download leaves only a temporary file, which
the next download ignores and the cache's clean-up removes.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

import xxhash
from fsspec import AbstractFileSystem
from fsspec.callbacks import TqdmCallback

from . import fsio, layout

ENV_CACHE_DIR = "INFOBATCH_STREAM_CACHE"


def default_cache_dir() -> str:
    """``$INFOBATCH_STREAM_CACHE``, else ``$XDG_CACHE_HOME/infobatch-stream`` (~/.cache/...)."""
    if os.environ.get(ENV_CACHE_DIR):
        return os.environ[ENV_CACHE_DIR]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "infobatch-stream")


def store_cache_dir(cache_dir: str, fs: AbstractFileSystem, root: str) -> str:
    """A directory of the cache that belongs to one store (named by a hash of its URL)."""
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    name = xxhash.xxh3_64_hexdigest(f"{protocol}://{root}".encode())
    return os.path.join(cache_dir, name)


@contextmanager
def _locked(path: str) -> Iterator[None]:
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def fetch(fs: AbstractFileSystem, remote: str, directory: str, expected_bytes: int, *,
          replace_inode: int | None = None) -> tuple[str, bool]:
    """(local path of a cached copy of the immutable remote file ``remote``, whether this call
    downloaded it).

    ``replace_inode``: the cached copy with this inode was found damaged; it is downloaded
    again unless another process already replaced it.
    """
    os.makedirs(directory, exist_ok=True)
    final = os.path.join(directory, remote.rsplit("/", 1)[-1])
    if replace_inode is None and os.path.exists(final):
        return final, False
    with _locked(final + ".lock"):
        try:
            found = os.stat(final).st_ino
        except FileNotFoundError:
            found = None
        if found is not None and found != replace_inode:  # another process finished it meanwhile
            return final, False
        tmp = fsio.local_tmp_name(final)
        try:
            callback = TqdmCallback(tqdm_kwargs={"desc": f"download {remote}", "unit": "B",
                                                 "unit_scale": True, "leave": False,
                                                 "disable": None if expected_bytes > 64 << 20 else True})
            fsio.get_file(fs, remote, tmp, callback=callback)
            size = os.path.getsize(tmp)
            if size != expected_bytes:
                raise ValueError(f"downloaded {size} bytes, the manifest says {expected_bytes}")
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return final, True


def snapshot_epoch(name: str) -> int | None:
    """The epoch of a cached snapshot file's base name (None for other files)."""
    return layout.snapshot_epoch(f"{layout.SNAPSHOTS}/{name}")


def _remove_unless_locked(lock: str, *paths: str) -> bool:
    """Remove ``paths`` while holding ``lock`` (taken without waiting); False if it is held,
    that is, a download of that file is in progress in some process of this machine."""
    try:
        with open(lock, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            for path in paths:
                fsio.remove_local(path)
        return True
    except BlockingIOError:
        return False


def evict(directory: str, keep: set[str], before: float | None = None) -> None:
    """Remove cached files of one store except those named in ``keep`` (base names), and the
    temporaries that crashed downloads or commits left.

    Processes that still map a removed file keep reading it: unlinking does not unmap. A
    download's temporary file goes only when no process is downloading that file (its lock
    is free); a commit's work directory only when last modified before ``before`` and no
    live commit holds it (``fsio.sweep_temporaries``).
    """
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    if before is not None:
        fsio.sweep_temporaries(directory, before, files=False)
    for name in names:
        path = os.path.join(directory, name)
        if name.startswith(fsio.COMMIT_DIR_PREFIX):
            continue  # swept above, with its own rule
        if name.startswith(fsio.TMP_PREFIX):  # .tmp-<32 hex>-<base>: a download's
            base = name[len(fsio.TMP_PREFIX) + 33:]
            _remove_unless_locked(os.path.join(directory, base + ".lock"), path)
            continue
        base = name[: -len(".lock")] if name.endswith(".lock") else name
        if base in keep:
            continue
        if name.endswith(".lock"):  # never pull the lock from under a live download
            _remove_unless_locked(path, path)
            continue
        fsio.remove_local(path)


def evict_older(directory: str, epoch: int, keep_epochs: int) -> None:
    """On a machine that only reads: after downloading the snapshot of ``epoch``, drop cached
    snapshots more than ``keep_epochs`` epochs older (every machine's cache stays bounded,
    not only the committing one's, which retention evicts)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    keep = set()
    for name in names:
        base = name[: -len(".lock")] if name.endswith(".lock") else name
        file_epoch = snapshot_epoch(base)
        if file_epoch is not None and file_epoch > epoch - keep_epochs:
            keep.add(base)
    evict(directory, keep)

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
from contextlib import contextmanager
from typing import Iterator

import xxhash
from fsspec import AbstractFileSystem
from fsspec.callbacks import TqdmCallback

from . import fsio

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


def fetch(fs: AbstractFileSystem, remote: str, directory: str, expected_bytes: int) -> str:
    """The local path of a cached copy of the immutable remote file ``remote``."""
    os.makedirs(directory, exist_ok=True)
    final = os.path.join(directory, remote.rsplit("/", 1)[-1])
    if os.path.exists(final):
        return final
    with _locked(final + ".lock"):
        if os.path.exists(final):  # another process finished it while we waited
            return final
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
    return final


def evict(directory: str, keep: set[str]) -> None:
    """Remove cached files of one store except those named in ``keep`` (base names).

    Processes that still map a removed file keep reading it: unlinking does not unmap.
    """
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in names:
        base = name[: -len(".lock")] if name.endswith(".lock") else name
        if base in keep:
            continue
        if name.startswith(fsio.TMP_PREFIX):
            continue  # may be a download in progress
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass

"""The few filesystem operations the store needs, on any fsspec filesystem.

Only two things depend on the backend, and both are decided here:

- where a file is local it is memory-mapped in place; elsewhere it is fetched into a cache;
- a whole-file write is atomic: locally a temporary file is renamed (or hard-linked, for an
  exclusive create) into place; object stores (S3, GCS, ...) make a single PUT visible whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

TMP_PREFIX = ".tmp-"
COMMIT_DIR_PREFIX = f"{TMP_PREFIX}commit-"
LIVE_LOCK = "live.lock"  # held (flock) by a commit for as long as its work directory lives


def open_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """(filesystem, root path without a trailing slash) for a store URL or local path."""
    if not isinstance(url, (str, os.PathLike)):
        raise TypeError(f"store URL must be a str or path, got {type(url).__name__}")
    url = os.fspath(url)
    if not url:
        raise ValueError("store URL is empty; pass a directory or an URL such as s3://bucket/scores")
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, root.rstrip("/") or root


def local_path(fs: AbstractFileSystem, path: str) -> str | None:
    """The OS path of ``path`` when ``fs`` is the local disk, else None."""
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return path if ("file" in protocol or "local" in protocol) else None


def join(root: str, relpath: str) -> str:
    return f"{root}/{relpath}"


def read_bytes(fs: AbstractFileSystem, path: str) -> bytes:
    """A whole file, read fresh: files appear as other processes commit, and a listing that
    s3fs cached before would make a new file look missing."""
    fs.invalidate_cache(path)
    return fs.cat_file(path)


def get_file(fs: AbstractFileSystem, path: str, local: str, **kwargs: Any) -> None:
    """Download ``path`` to the local file ``local`` (fresh, as ``read_bytes``)."""
    fs.invalidate_cache(path)
    fs.get_file(path, local, **kwargs)


def list_names(fs: AbstractFileSystem, directory: str) -> list[str]:
    """Base names in ``directory`` (empty when it does not exist), never from a stale cache."""
    fs.invalidate_cache(directory)
    try:
        entries = fs.ls(directory, detail=False)
    except FileNotFoundError:
        return []
    names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries]
    return sorted(name for name in names if name and not name.startswith(TMP_PREFIX))


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _local_install(tmp: str, final: str, exclusive: bool) -> None:
    """Move a complete local temporary file into place; with ``exclusive``, never replace."""
    try:
        if exclusive:
            os.link(tmp, final)  # fails with FileExistsError instead of replacing
            os.unlink(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(os.path.dirname(final))


def local_tmp_name(final: str) -> str:
    directory, base = os.path.split(final)
    return os.path.join(directory, f"{TMP_PREFIX}{uuid.uuid4().hex}-{base}")


def write_bytes(fs: AbstractFileSystem, path: str, data: bytes, *, exclusive: bool = False) -> None:
    """Write a whole file so that no reader ever sees part of it.

    With ``exclusive`` an existing file is never replaced: FileExistsError instead.
    """
    local = local_path(fs, path)
    if local is not None:
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = local_tmp_name(local)
        try:
            with open(tmp, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            remove_local(tmp)  # a full disk must not be left fuller by a partial temporary
            raise
        _local_install(tmp, local, exclusive)
        return
    if exclusive:
        _remote_create(fs, path, lambda **kw: fs.pipe_file(path, data, **kw))
    else:
        fs.pipe_file(path, data)


def _remote_create(fs: AbstractFileSystem, path: str, write: Any) -> None:
    """An exclusive create on a remote filesystem: ``write(**kw)`` as a conditional PUT where
    the backend has one (s3fs sends If-None-Match), else after a check (racy, but one rank
    commits)."""
    try:
        write(mode="create")
    except TypeError:  # a backend without ``mode``
        if fs.exists(path):
            raise FileExistsError(path) from None
        write()


def put_file(fs: AbstractFileSystem, source: str, path: str, *, exclusive: bool = False,
             callback: Any = None) -> None:
    """Copy the complete local file ``source`` to ``path``, atomically (see ``write_bytes``)."""
    local = local_path(fs, path)
    if local is not None:
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = local_tmp_name(local)
        try:
            os.link(source, tmp)  # same disk: no copy
        except OSError:
            import shutil

            try:
                shutil.copyfile(source, tmp)
            except BaseException:
                remove_local(tmp)
                raise
        _local_install(tmp, local, exclusive)
        return
    kwargs = {"callback": callback} if callback is not None else {}
    if exclusive:
        _remote_create(fs, path, lambda **kw: fs.put_file(source, path, **kwargs, **kw))
    else:
        fs.put_file(source, path, **kwargs)


def remove(fs: AbstractFileSystem, path: str) -> None:
    """Delete one file; a file that is already gone is not an error. On a local disk a link
    is removed itself (never its target) and a directory is left alone."""
    local = local_path(fs, path)
    if local is not None:
        with contextlib.suppress(IsADirectoryError):   # unlink: a link itself, never its target
            remove_local(local)
        return
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def inside_root(root: str, path: str) -> bool:
    """Whether the local ``path``, symbolic links resolved, lies under the local ``root``.

    A manifest can only name files inside the store (``layout`` checks the names); this
    also refuses a file of the store that is a symbolic link leading out of it, so the
    store never reads outside its root. The root itself may be a link.
    """
    real_root = os.path.realpath(root)
    return os.path.commonpath([real_root, os.path.realpath(path)]) == real_root


def _dead_work_directory(path: str) -> bool:
    """Whether no live process holds the commit work directory ``path`` (its lock is free)."""
    try:
        fd = os.open(os.path.join(path, LIVE_LOCK), os.O_RDONLY)
    except FileNotFoundError:
        return True  # killed before it took its lock (the age check covers a fresh one)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases the probe's lock
    return True


def _remove_tree(path: str) -> None:
    for directory, subdirs, names in os.walk(path, topdown=False):
        for name in names:
            remove_local(os.path.join(directory, name))
        for name in subdirs:
            try:
                os.rmdir(os.path.join(directory, name))
            except FileNotFoundError:
                pass
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass


def remove_local(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def sweep_temporaries(directory: str, before: float, *, files: bool = True) -> list[str]:
    """Remove the stale temporaries of one local directory; return their names.

    A temporary (``.tmp-*``) is a write or commit that was killed before its rename:
    nothing reads it, and nothing will finish it. It is stale when it was last modified
    before ``before`` (the start of the commit that sweeps, which no writer of the job
    overlaps) and, for a commit's work directory, when no live commit holds its lock.
    ``files=False`` leaves temporary files alone (in the snapshot cache, a download's
    temporary is judged by its download lock instead).
    """
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for entry in entries:
        if not entry.name.startswith(TMP_PREFIX):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_mtime >= before:
                continue
            if entry.is_dir(follow_symlinks=False):
                if not entry.name.startswith(COMMIT_DIR_PREFIX) or not _dead_work_directory(entry.path):
                    continue
                _remove_tree(entry.path)
            elif files:
                remove_local(entry.path)
            else:
                continue
        except FileNotFoundError:
            continue
        removed.append(entry.name)
    return removed


def hold_work_directory(path: str) -> int:
    """Mark the commit work directory ``path`` live: a lock held until the returned fd closes."""
    fd = os.open(os.path.join(path, LIVE_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd

"""The few filesystem operations the store needs, on any fsspec filesystem.

Only two things depend on the backend, and both are decided here:

- where a file is local it is memory-mapped in place; elsewhere it is fetched into a cache;
- a whole-file write is atomic: locally a temporary file is renamed (or hard-linked, for an
  exclusive create) into place; object stores (S3, GCS, ...) make a single PUT visible whole.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import fsspec
from fsspec import AbstractFileSystem

from .errors import StoreUnavailableError

log = logging.getLogger(__name__)
T = TypeVar("T")

TMP_PREFIX = ".tmp-"
COMMIT_DIR_PREFIX = f"{TMP_PREFIX}commit-"
LIVE_LOCK = "live.lock"  # held (flock) by a commit for as long as its work directory lives


@dataclass(frozen=True)
class RetryPolicy:
    """How long the store keeps trying a storage operation that fails for a transient reason.

    A step (read a manifest, write a delta, upload a snapshot, list a directory) that fails
    with a connection error or a timeout is tried again after ``first_delay`` seconds, then
    after twice that, and so on up to ``max_delay``, ``attempts`` times in all, and never
    starts a new attempt ``deadline`` seconds or more after the first one started; then
    ``StoreUnavailableError`` names the URL and the file. Each wait is drawn between half its
    nominal value and the value itself (jitter, so that ranks do not retry in step). A single
    attempt is bounded by the backend's own timeouts and retries (s3fs: connect 5 s, read
    15 s, each request retried by botocore and s3fs): the deadline keeps those from
    multiplying by ``attempts``.

    This sits on top of the backend's own per-request retries (s3fs and botocore retry each
    HTTP request: for S3, botocore's 'legacy' mode gives up on a refused connection after
    about 8 s); it is what rides out an outage longer than those, such as an S3 server
    restart. Errors that are not transient (a missing file, a refused permission, a damaged
    file) are never retried.

    >>> RetryPolicy().nominal_delays()
    [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    """

    attempts: int = 7
    first_delay: float = 0.5
    max_delay: float = 8.0
    deadline: float = 120.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) \
                or not 1 <= self.attempts <= 1000:
            raise ValueError(f"retries: attempts must be an int in [1, 1000], got {self.attempts!r}")
        for name in ("first_delay", "max_delay", "deadline"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0 <= value <= 3600:
                raise ValueError(f"retries: {name} must be a number of seconds in [0, 3600], "
                                 f"got {value!r}")

    @classmethod
    def of(cls, value: "RetryPolicy | int | None") -> "RetryPolicy":
        """A policy from ``ScoreStore(retries=...)``: a policy, an attempt count, or None."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(attempts=value)
        raise TypeError(f"retries must be a RetryPolicy or a number of attempts, got {value!r}")

    def nominal_delays(self) -> list[float]:
        """The waits between attempts before jitter: the budget is their sum plus the attempts."""
        return [min(self.max_delay, self.first_delay * 2 ** i) for i in range(self.attempts - 1)]


# Exceptions of the backends' own HTTP stacks that mean "try again": named by module and
# class, so that neither botocore nor aiohttp has to be installed to use a local store.
_TRANSIENT_NAMES = {
    "botocore.exceptions": ("ConnectionError", "HTTPClientError"),
    "aiohttp.client_exceptions": ("ClientConnectionError", "ClientPayloadError",
                                  "ServerTimeoutError"),
    "fsspec.exceptions": ("FSTimeoutError",),
}
_NOT_TRANSIENT = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                  PermissionError)


def is_transient(exc: BaseException) -> bool:
    """Whether a failed storage call may succeed if tried again (the network, not the data)."""
    if isinstance(exc, _NOT_TRANSIENT):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    for cls in type(exc).__mro__:
        if cls.__name__ in _TRANSIENT_NAMES.get(cls.__module__, ()):
            return True
    # s3fs turns HTTP 500 and 503 (after botocore's retries) into these OSErrors.
    if isinstance(exc, OSError) and exc.errno in (errno.EREMOTEIO, errno.EBUSY) \
            and type(exc.__cause__).__module__.startswith("botocore"):
        return True
    return False


def _is_backend_error(exc: BaseException) -> bool:
    """An exception of a backend's HTTP stack (not an OSError a caller can act on)."""
    return type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp")


def with_retries(policy: RetryPolicy, url: str, action: str, path: str,
                 func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``func(*args, **kwargs)``, tried again on transient failures as ``policy`` says.

    Past the budget (or at once, for a backend error that no retry can fix, such as missing
    credentials) a ``StoreUnavailableError`` names the URL and the file. Every operation the
    store retries is idempotent: whole-file writes under unique names, exclusive creates
    whose callers check what a lost reply may have left (see ``ScoreStore.commit``),
    deletes that accept a missing file, and reads.
    """
    start = time.monotonic()
    for attempt in range(1, policy.attempts + 1):
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            transient = is_transient(exc)
            if not transient and not _is_backend_error(exc):
                raise
            elapsed = time.monotonic() - start
            if not transient or attempt == policy.attempts or elapsed >= policy.deadline:
                raise StoreUnavailableError(url, action, path, attempt, elapsed, exc) from exc
            delay = policy.nominal_delays()[attempt - 1]
            delay = delay / 2 + random.random() * delay / 2
            log.warning("%s: %s %s failed (%s: %s); attempt %d of %d in %.2f s", url, action,
                        path, type(exc).__name__, exc, attempt + 1, policy.attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


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
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
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

            shutil.copyfile(source, tmp)
        _local_install(tmp, local, exclusive)
        return
    kwargs = {"callback": callback} if callback is not None else {}
    if exclusive:
        _remote_create(fs, path, lambda **kw: fs.put_file(source, path, **kwargs, **kw))
    else:
        fs.put_file(source, path, **kwargs)


def remove(fs: AbstractFileSystem, path: str) -> None:
    """Delete one file; a file that is already gone is not an error."""
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

"""Retries of storage steps that fail for a transient reason, within a bounded budget.

The backends retry each request already (botocore: connection errors, timeouts, 5xx and
throttling; s3fs: interrupted reads). This layer retries a whole store step on top, so that
an outage longer than those (an S3 or MinIO restart) is ridden out, and past its budget it
raises one error that names the store's URL and the file, never a raw botocore or aiohttp
exception.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .checks import check_int, check_number
from .errors import StoreUnavailableError

log = logging.getLogger(__name__)
T = TypeVar("T")


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
        check_int(self.attempts, "retries: attempts", 1, 1000, numpy=False)
        for name in ("first_delay", "max_delay", "deadline"):
            check_number(getattr(self, name), f"retries: {name} (seconds)", 0, 3600)

    @classmethod
    def of(cls, value: RetryPolicy | int | None) -> RetryPolicy:
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
    return isinstance(exc, OSError) and exc.errno in (errno.EREMOTEIO, errno.EBUSY) \
        and type(exc.__cause__).__module__.startswith("botocore")


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

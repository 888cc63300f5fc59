"""Errors raised by the score store. Each names the file or URL at fault and what to do."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error the score store raises."""


class NotAStoreError(StoreError):
    """The URL holds something that is not an infobatch-stream score store."""


class CorruptStoreError(StoreError):
    """A persisted file is truncated, malformed or does not match its manifest.

    ``path`` is the file at fault; ``last_good_epoch`` the newest epoch whose manifest and
    snapshot still verify (None when there is none).
    """

    def __init__(self, path: str, problem: str, last_good_epoch: int | None):
        self.path = path
        self.problem = problem
        self.last_good_epoch = last_good_epoch
        good = "none" if last_good_epoch is None else str(last_good_epoch)
        super().__init__(
            f"{path}: {problem}. Last good epoch: {good}. The file was written by a crashed or "
            f"foreign process, or damaged in storage; restore it, or delete the epochs after the "
            f"last good one to resume from there."
        )


class OwnershipError(StoreError):
    """The store's last commit was made by another training run (a different ``run_id``)."""


class StoreUnavailableError(StoreError):
    """The storage behind the store kept failing (unreachable, timing out) past the retry budget.

    ``url`` is the store, ``path`` the file being read or written, ``attempts`` how many times
    it was tried. Nothing half-written is ever visible, so the store is as it was before the
    failed step: re-run the step once the storage answers.
    """

    def __init__(self, url: str, action: str, path: str, attempts: int, seconds: float,
                 cause: BaseException):
        self.url = url
        self.path = path
        self.attempts = attempts
        reason = " ".join(f"{type(cause).__name__}: {cause}".split())
        tries = "once" if attempts == 1 else f"{attempts} times over {seconds:.1f} s"
        super().__init__(
            f"{url}: could not {action} {path}, tried {tries} ({reason}). The storage is "
            f"unreachable or failing; committed epochs are intact and nothing half-written is "
            f"visible, so re-run this step once it answers (ScoreStore(..., retries=...) sets "
            f"the retry budget)"
        )


class SettingsMismatchError(OwnershipError):
    """The store was written with other run settings (prune ratio, seed, ...) than this run's.

    ``differences`` maps each differing setting to (the store's value, this run's value).
    """

    def __init__(self, message: str, differences: dict[str, tuple[object, object]]):
        self.differences = differences
        super().__init__(message)


class FencedError(OwnershipError):
    """This process's incarnation of its run was superseded by a newer one (a restart or a
    takeover): it must stop, and its writes and commits are refused so the two never co-train.

    ``incarnation`` is this process's, ``superseded_by`` the newest in the store.
    """

    def __init__(self, message: str, incarnation: int, superseded_by: int):
        self.incarnation = incarnation
        self.superseded_by = superseded_by
        super().__init__(message)


class StorageFullError(StoreError):
    """A write failed because its disk or quota is full (ENOSPC, EDQUOT); not retried.

    ``url`` is the store, ``path`` the file being written. Nothing half-written is visible and
    a writer keeps its rows buffered: free space (or move the cache) and re-run the step.
    """

    def __init__(self, url: str, path: str, advice: str, cause: BaseException):
        self.url = url
        self.path = path
        reason = " ".join(f"{type(cause).__name__}: {cause}".split())
        super().__init__(f"{url}: no space left writing {path} ({reason}). {advice}; then re-run "
                         f"this step: nothing half-written is visible and recorded scores stay "
                         f"buffered until a write succeeds")


class LinkedFolderError(StoreError):
    """A folder inside a local store (``manifests/``, ``deltas/epoch-6/``, ...) is a symbolic link.

    The store writes and deletes only inside its root, and never through a linked folder.
    """


class RetiredEpochError(StoreError):
    """The epoch asked for was retired by retention (``keep_snapshots``) before it was opened."""

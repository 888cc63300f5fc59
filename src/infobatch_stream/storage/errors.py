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

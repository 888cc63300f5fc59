"""Epochs counted in samples drawn: what makes pruning save compute on resampled shards.

``wds.WebDataset(urls, resampled=True)...with_epoch(n)`` (webdataset's pattern for
multi-node training) draws shards forever and ends a worker's epoch after ``n`` samples
have LEFT the pipeline. A stage that drops samples before that point only makes the
pipeline draw more: every epoch trains ``n`` samples, and nothing is saved. For compute to
fall, the epoch's length must be counted where the samples are drawn, before the stage.

``EpochDraws`` is that count, one per ``ib.stage(epoch_samples=n)`` call, held by the stage
(so each DataLoader worker process has its own copy). It ends this worker's epoch after
``n`` samples drawn: the stage stops yielding, and when ``with_epoch`` runs the pipeline
again to fill its ``n`` outputs, the stage yields nothing, so ``with_epoch`` stops too
(webdataset ends an epoch on a pass that yields nothing). The count belongs to (process,
epoch to train): it survives ``with_epoch``'s re-runs within an epoch and starts again
from 0 when the store commits the epoch (the epoch boundary lives in the store), in a new
worker process (non-persistent workers) and after a restart.

Without an epoch length, a pass that starts again in the same epoch after its shards ran
out means the pipeline repeats within the epoch (``with_epoch``/``repeat`` on finite
shards): pruning then saves nothing, and ``EpochDraws`` warns once per process.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from itertools import islice

from ..storage.checks import check_int

_warned_repeat = False  # once per process: the same advice every epoch is noise


class EpochDraws:
    """One worker's samples drawn in the epoch being trained; ``samples``: its epoch length.

    ``samples=None`` counts passes only (to warn about a pipeline that repeats in an epoch).

    >>> draws = EpochDraws(3)
    >>> source = draws.begin(epoch=1, data=range(10))
    >>> list(source), draws.drawn
    ([0, 1, 2], 3)
    >>> list(draws.begin(epoch=1, data=range(10)))     # with_epoch's re-run: nothing left
    []
    >>> list(draws.begin(epoch=2, data=range(10)))     # the next epoch starts from 0
    [0, 1, 2]
    """

    def __init__(self, samples: int | None = None):
        self.samples = None if samples is None else check_int(samples, "epoch_samples", 1)
        self.owner: tuple[int, int] | None = None  # (process id, epoch) the counts belong to
        self.drawn = 0
        self.passes_done = 0  # passes of this epoch whose source ran out

    def begin(self, epoch: int, data: Iterable) -> Iterator:
        """Start a pass of ``epoch`` over ``data``: the source, cut at what the epoch has left."""
        owner = (os.getpid(), epoch)
        if self.owner != owner:  # a new epoch, or a worker forked from a process that counted
            self.owner, self.drawn, self.passes_done = owner, 0, 0
        elif self.samples is None and self.passes_done:
            _warn_repeat(epoch)
        if self.samples is None:
            return iter(data)
        return islice(data, max(0, self.samples - self.drawn))

    def took(self, count: int) -> None:
        """``count`` more samples were drawn in this pass (0: the pass's source ran out)."""
        self.drawn += count
        if not count:
            self.passes_done += 1

    def __repr__(self) -> str:
        return f"EpochDraws(samples={self.samples}, drawn={self.drawn}, owner={self.owner})"


def _warn_repeat(epoch: int) -> None:
    global _warned_repeat
    if _warned_repeat:
        return
    _warned_repeat = True
    warnings.warn(
        f"the pruning stage ran again in epoch {epoch} after its shards ran out in this worker: "
        f"the pipeline repeats within an epoch (with_epoch(n) or repeat() on shards holding "
        f"fewer than n samples per worker), so pruned samples are simply replaced by more "
        f"draws and no compute is saved. Give the stage the epoch's length in samples drawn "
        f"per worker, ib.stage(epoch_samples=n) (with_epoch may stay, as an upper bound). "
        f"Other causes: the epoch was never committed (ib.end_epoch(), or the ib.epochs() "
        f"loop, ends it), or the data is iterated twice per epoch on purpose (then ignore "
        f"this)", stacklevel=3)

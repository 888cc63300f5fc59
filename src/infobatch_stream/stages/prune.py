"""The pruning stages, in webdataset's idiom: a private generator and its curried public name.

Both run in the DataLoader workers right after the tar reader, before decode, so a pruned
sample costs no decode, no augmentation, no forward and no backward. When a worker starts
iterating (each epoch, persistent workers or not) the stage reads the latest committed epoch
``e`` of the store and decides epoch ``e + 1`` from snapshot ``e``; the store reloads the
snapshot only when the manifest changed. Samples are decided a window at a time: one
hash, one lookup and one draw per window, and O(1) work per sample.

Fields added to each sample that passes:

- ``__score__``: its last loss (NaN when never seen);
- ``__weight__``: the loss weight (``1/(1-r)`` for a kept below-mean sample, else 1.0);
- ``__key_hash__``: the store's 64-bit hash of its key, as a signed int (it collates to an
  int64 tensor and ``InfoBatch.update`` accepts it as the key).

``soft_prune(..., draws=EpochDraws(n))`` ends this worker's epoch after ``n`` samples drawn
(``stages.draws``: resampled shards); a stage that finds its samples already decoded warns
once per process (the decode of every pruned sample was wasted).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from itertools import compress, islice
from operator import itemgetter

import numpy as np
from webdataset.filters import pipelinefilter
from webdataset.handlers import reraise_exception

from ..storage import ScoreSnapshot, ScoreStore, hash_keys
from . import urls
from .draws import EpochDraws
from .keyfn import KeyFunction, key_hash, sample_key
from .policy import EpochRule, PruningPolicy

# A DataLoader worker started with "spawn" imports this module to unpickle the stage: it
# then reads the same shard URLs as its parent.
urls.register_fsspec_schemes()

# Samples decided together. Larger amortises the window's numpy calls; smaller holds fewer
# raw samples per worker (256 JPEGs of 100 KB are 25 MB). docs/benchmark-findings.md has
# the throughput measured at several sizes.
DEFAULT_WINDOW = 256
# The default key's C-level equivalent, for the fast path; a KeyError from it sends the
# window to the slow path, where ``sample_key`` raises its explanatory error.
_FAST_SAMPLE_KEY = itemgetter("__key__")
# What the tar reader hands over: payloads are still bytes. Anything else was decoded.
_RAW = (bytes, bytearray, memoryview)
_warned_decoded = False


def epoch_to_train(store: ScoreStore) -> tuple[int, ScoreSnapshot]:
    """(epoch the next iteration trains, snapshot it prunes from): latest committed + 1.

    The epoch is taken from the snapshot opened, never from a listing made before it: an
    epoch retired while it is being opened makes the store open the newer one, and an
    empty store gives epoch 0 with the empty snapshot (never epoch 0 from snapshot 0).

    >>> epoch_to_train(store)      # doctest: +SKIP
    (5, ScoreSnapshot(epoch=4, keys=1281167, mean=2.31))
    """
    snapshot = store.snapshot()
    return (0 if snapshot.epoch is None else snapshot.epoch + 1), snapshot


def _one_by_one(samples: list, key: KeyFunction, handler) -> tuple[list, np.ndarray, bool]:
    """The slow path of a window where some key failed: each failure goes to ``handler``.

    Returns (the samples that have a key, their key hashes, whether the handler said stop).
    """
    good: list[dict] = []
    hashes: list[int] = []
    stop = False
    for sample in samples:
        try:
            hashes.append(key_hash(sample, key))
        except Exception as exn:
            if handler(exn):
                continue
            stop = True
            break
        good.append(sample)
    return good, np.array(hashes, np.uint64), stop


def warn_if_decoded(sample: dict) -> None:
    """Warn once per process when a sample's payload fields are no longer raw bytes."""
    global _warned_decoded
    if _warned_decoded or not isinstance(sample, dict):
        return
    decoded = sorted(str(name) for name, value in sample.items()
                     if not str(name).startswith("__") and not isinstance(value, _RAW))
    if decoded:
        _warned_decoded = True
        warnings.warn(
            f"the pruning stage sees decoded samples (fields {decoded} of a sample of "
            f"{sample.get('__url__', 'an unknown shard')} are not bytes): the stage comes after "
            f"decode, so pruned samples were decoded for nothing; put .compose(ib.stage()) "
            f"right after the tar reader (wds.WebDataset(...)), before .decode() and .map()",
            stacklevel=2)


def _windows(data: Iterable[dict], key: KeyFunction, window: int, handler,
             draws: EpochDraws | None = None) -> Iterator[tuple[list, np.ndarray]]:
    """Group samples into windows of ``window`` with their key hashes; bad samples go to ``handler``.

    The common case runs in C: ``islice`` cuts the window, ``map`` takes every key and
    ``hash_keys`` hashes them at once. Only a window in which some key fails (missing, or
    not a string) is redone one sample at a time, through ``handler``. ``draws`` counts
    the samples drawn (the source is already cut at what the epoch has left).
    """
    fast_key = _FAST_SAMPLE_KEY if key is sample_key else key
    source = iter(data)
    first = True
    while True:
        samples = list(islice(source, window))
        if draws is not None:
            draws.took(len(samples))
        if not samples:
            return
        if first:  # one sample per pass: decoding is a property of the pipeline, not the sample
            warn_if_decoded(samples[0])
            first = False
        try:
            hashes = hash_keys(list(map(fast_key, samples)))
        except Exception:
            samples, hashes, stop = _one_by_one(samples, key, handler)
            if samples:
                yield samples, hashes
            if stop:
                return
            continue
        yield samples, hashes


def _lookup_scores(data, store: ScoreStore, key: KeyFunction = sample_key,
                   window: int = DEFAULT_WINDOW, handler=reraise_exception):
    """Attach ``__score__`` (last loss, NaN if unseen) and ``__key_hash__``; drop nothing."""
    _, snapshot = epoch_to_train(store)
    for samples, hashes in _windows(data, key, window, handler):
        scores = snapshot.lookup(hashes)
        for sample, score, signed in zip(samples, scores.tolist(), hashes.view(np.int64).tolist(),
                                         strict=True):
            sample["__score__"] = score
            sample["__key_hash__"] = signed
        yield from samples


def _soft_prune(data, store: ScoreStore, policy: PruningPolicy, key: KeyFunction = sample_key,
                window: int = DEFAULT_WINDOW, handler=reraise_exception,
                draws: EpochDraws | None = None):
    """Look up, soft-prune, rescale and anneal: drop samples by ``policy``, weight the rest.

    ``draws``: this worker's samples drawn in the epoch; with an epoch length it ends the
    epoch after that many samples drawn (resampled shards), see ``stages.draws``.
    """
    epoch, snapshot = epoch_to_train(store)
    rule: EpochRule = policy.rule(epoch, snapshot)
    if draws is not None:
        data = draws.begin(epoch, data)
    for samples, hashes in _windows(data, key, window, handler, draws):
        scores = snapshot.lookup(hashes)
        weights = rule.weights(hashes, scores)
        kept = weights != 0
        if not kept.all():  # select first: the per-sample loop below sees only the kept
            samples = list(compress(samples, kept.tolist()))
            hashes, scores, weights = hashes[kept], scores[kept], weights[kept]
        for sample, score, weight, signed in zip(samples, scores.tolist(), weights.tolist(),
                                                 hashes.view(np.int64).tolist(), strict=True):
            sample["__score__"] = score
            sample["__weight__"] = weight
            sample["__key_hash__"] = signed
        yield from samples


lookup_scores = pipelinefilter(_lookup_scores)
soft_prune = pipelinefilter(_soft_prune)

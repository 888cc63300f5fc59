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
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
from webdataset.filters import pipelinefilter
from webdataset.handlers import reraise_exception

from ..storage import ScoreStore, hash_keys
from .keyfn import KeyFunction, sample_key
from .policy import EpochRule, PruningPolicy

DEFAULT_WINDOW = 512


def epoch_to_train(store: ScoreStore):
    """(epoch the next iteration trains, snapshot it prunes from): latest committed + 1."""
    latest = store.latest_epoch
    epoch = 0 if latest is None else latest + 1
    return epoch, store.snapshot(latest)


def _windows(data: Iterable[dict], key: KeyFunction, window: int, handler) -> Iterator[tuple[list, list]]:
    """Group samples into windows of ``window``, with their key strings; bad samples go to ``handler``."""
    samples: list[dict] = []
    names: list = []
    for sample in data:
        try:
            name = key(sample)
        except Exception as exn:
            if handler(exn):
                continue
            break
        samples.append(sample)
        names.append(name)
        if len(samples) >= window:
            yield samples, names
            samples, names = [], []
    if samples:
        yield samples, names


def _lookup_scores(data, store: ScoreStore, key: KeyFunction = sample_key,
                   window: int = DEFAULT_WINDOW, handler=reraise_exception):
    """Attach ``__score__`` (last loss, NaN if unseen) and ``__key_hash__``; drop nothing."""
    _, snapshot = epoch_to_train(store)
    for samples, names in _windows(data, key, window, handler):
        hashes = hash_keys(names)
        scores = snapshot.lookup(hashes)
        for sample, score, signed in zip(samples, scores.tolist(), hashes.view(np.int64).tolist()):
            sample["__score__"] = score
            sample["__key_hash__"] = signed
            yield sample


def _soft_prune(data, store: ScoreStore, policy: PruningPolicy, key: KeyFunction = sample_key,
                window: int = DEFAULT_WINDOW, handler=reraise_exception):
    """Look up, soft-prune, rescale and anneal: drop samples by ``policy``, weight the rest."""
    epoch, snapshot = epoch_to_train(store)
    rule: EpochRule = policy.rule(epoch, snapshot)
    for samples, names in _windows(data, key, window, handler):
        hashes = hash_keys(names)
        scores = snapshot.lookup(hashes)
        weights = rule.weights(hashes, scores)
        for sample, score, weight, signed in zip(samples, scores.tolist(), weights.tolist(),
                                                 hashes.view(np.int64).tolist()):
            if weight:
                sample["__score__"] = score
                sample["__weight__"] = weight
                sample["__key_hash__"] = signed
                yield sample


lookup_scores = pipelinefilter(_lookup_scores)
soft_prune = pipelinefilter(_soft_prune)

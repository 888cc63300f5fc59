"""Shards, stores and an independent reference of the pruning decisions for the stage tests.

The reference never calls the package's policy code: the key hash is ``xxhash`` directly,
the draw is SplitMix64 written out on Python integers, and the threshold is the mean of
the recorded float32 scores computed here. The stages must agree with it exactly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import webdataset as wds
import xxhash

import infobatch_stream as ibs

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def keys_of(n: int, prefix: str = "img-", start: int = 0) -> list[str]:
    return [f"{prefix}{i:07d}" for i in range(start, start + n)]


# -- the reference decision ----------------------------------------------------------------

def _mix64(x: int) -> int:
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def reference_draw(key: str, seed: int, epoch: int) -> float:
    """The uniform draw of (seed, epoch, key), from the documented construction."""
    stream = _mix64(_mix64((seed * GOLDEN + 1) & MASK) ^ (((epoch + 1) * GOLDEN) & MASK))
    return (_mix64(xxhash.xxh3_64_intdigest(key.encode()) ^ stream) >> 11) / float(1 << 53)


def reference_weights(keys: Iterable[str], scores: dict[str, float], *, epoch: int,
                      num_epochs: int, prune_ratio: float = 0.5, delta: float = 0.875,
                      seed: int = 0) -> dict[str, float]:
    """{key: weight} InfoBatch gives in ``epoch`` (0 = dropped); ``scores``: the last snapshot.

    The threshold is the mean of ``scores`` (float32 values, summed in float64);
    ``floor(delta * num_epochs)`` is taken on the decimal the user wrote (0.29 x 100 = 29).
    """
    from fractions import Fraction

    annealing = epoch >= math.floor(Fraction(str(delta)) * num_epochs)
    values = np.array(list(scores.values()), np.float32)
    mean = float(values.astype(np.float64).mean()) if len(values) else None
    kept_weight = float(np.float32(1.0 / (1.0 - prune_ratio)))
    out = {}
    for key in keys:
        score = scores.get(key)
        if annealing or mean is None or prune_ratio == 0 or score is None or not score < mean:
            out[key] = 1.0
        else:
            out[key] = 0.0 if reference_draw(key, seed, epoch) < prune_ratio else kept_weight
    return out


def kept(weights: dict[str, float]) -> set[tuple[str, float]]:
    """The (key, weight) pairs of the samples a decision keeps."""
    return {(k, w) for k, w in weights.items() if w}


# -- stores and samples ---------------------------------------------------------------------

def fill_store(store: ibs.ScoreStore, scores: dict[str, float], epoch: int) -> None:
    """Record ``scores`` as epoch ``epoch``'s losses and commit the epoch."""
    with store.writer(epoch) as writer:
        if scores:
            writer.record(list(scores), np.array(list(scores.values()), np.float32))
    store.commit(epoch)


def snapshot_scores(store: ibs.ScoreStore, keys: list[str]) -> dict[str, float]:
    """{key: last score} of the keys the latest snapshot knows (what epoch latest+1 prunes from)."""
    values = store.snapshot().lookup(keys)
    return {k: float(v) for k, v in zip(keys, values.tolist(), strict=True) if not math.isnan(v)}


def memory_samples(keys: Iterable[str], url: str = "mem://shard-0000.tar") -> list[dict]:
    """Raw samples as the tar reader hands them over: key, shard URL, undecoded bytes."""
    return [{"__key__": k, "__url__": url, "bin": b"x"} for k in keys]


def decisions(samples: Iterable[dict]) -> dict[str, float]:
    """{__key__: __weight__} of the samples a stage yields; fails on a key yielded twice."""
    out: dict[str, float] = {}
    for sample in samples:
        key = sample["__key__"]
        assert key not in out, f"{key} was yielded twice"
        out[key] = sample["__weight__"]
    return out


def pairs(items: Iterable) -> list[tuple[str, float]]:
    """(key, weight) pairs from a loader of ``to_tuple("__key__", "__weight__")`` samples."""
    return [(str(k), float(w)) for k, w in items]


# -- shards -------------------------------------------------------------------------------

def write_shards(directory: Path, n: int, *, seed: int = 0, maxsize: int = 600_000,
                 prefix: str = "img-") -> tuple[list[str], list[str], list[int]]:
    """Shards written by webdataset's ``ShardWriter``: random payload sizes make the shard
    sample counts uneven. Returns (shard paths, keys in order, samples per shard)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    keys = keys_of(n, prefix)
    pattern = str(directory / "shard-%04d.tar")
    with wds.ShardWriter(pattern, maxsize=maxsize, maxcount=10**9, verbose=0) as sink:
        for i, key in enumerate(keys):
            payload = rng.bytes(int(rng.integers(0, 4000)))
            sink.write({"__key__": key, "bin": payload, "cls": i % 10})
    paths = sorted(str(p) for p in directory.glob("shard-*.tar"))
    counts = []
    for path in paths:
        counts.append(sum(1 for _ in wds.DataPipeline(wds.SimpleShardList([path]),
                                                      wds.tarfile_to_samples())))
    return paths, keys, counts


def brace_url(paths: list[str]) -> str:
    """``dir/shard-{0000..000N}.tar`` for consecutive shard paths."""
    directory = os.path.dirname(paths[0])
    return f"{directory}/shard-{{0000..{len(paths) - 1:04d}}}.tar"

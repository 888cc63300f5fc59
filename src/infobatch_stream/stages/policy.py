"""Pruning policies: which samples of an epoch are dropped, and the weight of those kept.

A policy turns (epoch, snapshot of the previous epoch) into an ``EpochRule``: a small frozen
value (print it) that decides every sample of the epoch from its key hash and last score.
Decisions are a pure function of (rule, key hash, score): the random draw is a counter-based
hash of (seed, epoch, key hash), so a sample's fate is the same in any worker, on any rank,
after any restart, and the trainer or a planner can recompute it.

- ``InfoBatchPolicy`` (the default): a sample whose score is below the mean of the known
  scores is dropped with probability ``r`` and, if kept, weighted ``1/(1-r)``; every other
  sample (at or above the mean, or never seen) is kept with weight 1. From epoch
  ``floor(delta * num_epochs)`` on (annealing) everything is kept with weight 1.
- ``RandomPolicy``: the baseline at the same expected budget: every known sample is dropped
  with probability ``r * P(score < mean)``, kept samples weighted 1.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol, runtime_checkable

import numpy as np
from tqdm import tqdm

from ..storage import ScoreSnapshot
from ..storage.checks import check_int, check_number

_GOLDEN = 0x9E3779B97F4A7C15
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK = (1 << 64) - 1
_COUNT_CHUNK = 1 << 20  # keys decided at a time when counting a whole snapshot
_PROGRESS_KEYS = 50_000_000  # below this an exact count takes about a second: no progress bar


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a bijection of uint64 that scrambles every bit (wrapping)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


@functools.lru_cache(maxsize=256)
def _stream(seed: int, epoch: int) -> np.uint64:
    """One 64-bit stream id per (seed, epoch); cached: the stage asks for it every window."""
    state = np.array([(seed * _GOLDEN + 1) & _MASK], np.uint64)
    state = _mix64(_mix64(state) ^ np.uint64(((epoch + 1) * _GOLDEN) & _MASK))
    return state[0]


def uniform_draws(hashes: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """A uniform number in [0, 1) for each key hash: a counter-based hash of (seed, epoch, key).

    >>> a = uniform_draws(np.array([1, 2, 3], np.uint64), seed=0, epoch=5)
    >>> bool(((0 <= a) & (a < 1)).all()), (a == uniform_draws(np.array([1, 2, 3], np.uint64), 0, 5)).all()
    (True, True)
    """
    bits = _mix64(hashes ^ _stream(seed, epoch)) >> np.uint64(11)
    return bits.astype(np.float64) * (1.0 / (1 << 53))


def check_prune_ratio(prune_ratio: float) -> float:
    return check_number(prune_ratio, "prune_ratio", 0, 1, high_open=True)


def check_seed(seed: int) -> int:
    return check_int(seed, "seed", 0, (1 << 64) - 1)


def annealing_start(num_epochs: int, delta: float) -> int:
    """``floor(delta * num_epochs)`` without float error: 0.29 x 100 is 29, not 28.

    >>> annealing_start(100, 0.29), annealing_start(10, 0.875), annealing_start(3, 1.0)
    (29, 8, 3)
    """
    num_epochs = check_int(num_epochs, "num_epochs", 1)
    delta = check_number(delta, "delta", 0, 1)
    # The shortest decimal that reads back as ``delta`` is what the user wrote.
    return math.floor(Fraction(repr(delta)) * num_epochs)


@dataclass(frozen=True)
class EpochRule:
    """How every sample of one epoch is decided; a value you can print and compare.

    ``threshold``: scores strictly below it may be dropped (None: nothing is compared).
    ``drop_probability``: the chance a candidate is dropped. ``candidates``: "below_threshold"
    or "known" (every sample with a score). ``kept_weight``: the weight of a kept candidate.
    """

    epoch: int
    seed: int
    threshold: float | None
    drop_probability: float
    candidates: str = "below_threshold"
    kept_weight: float = 1.0

    @property
    def prunes(self) -> bool:
        return self.drop_probability > 0 and (self.threshold is not None or self.candidates == "known")

    def weights(self, hashes: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """float32 weight of each sample; 0 means dropped. ``scores`` NaN = never seen (kept)."""
        weights = np.ones(len(hashes), np.float32)
        if not self.prunes:
            return weights
        candidate = self.candidates_of(scores)
        weights[candidate] = self.kept_weight
        drop = candidate & (uniform_draws(hashes, self.seed, self.epoch) < self.drop_probability)
        weights[drop] = 0.0
        return weights

    def candidates_of(self, scores: np.ndarray) -> np.ndarray:
        """Which of these scores may be dropped (before the random draw)."""
        if not self.prunes:
            return np.zeros(len(scores), bool)
        if self.candidates == "known":
            return ~np.isnan(scores)
        # float64: exactly "below the mean"; NaN (unseen) compares False, so it is always kept
        return scores < np.float64(self.threshold)

    def count_kept(self, snapshot: ScoreSnapshot) -> int:
        """Exactly how many of the snapshot's keys this rule keeps (vectorized, in chunks)."""
        if not self.prunes:
            return len(snapshot)
        kept = 0
        n, chunk = len(snapshot), _COUNT_CHUNK
        for start in tqdm(range(0, n, chunk), desc=f"count epoch {self.epoch}", unit="chunk",
                          leave=False, disable=None if n >= _PROGRESS_KEYS else True):
            stop = start + chunk
            w = self.weights(snapshot.hashes[start:stop], snapshot.scores[start:stop])
            kept += int(np.count_nonzero(w))
        return kept


@runtime_checkable
class PruningPolicy(Protocol):
    """What the stage, the planner and checkpoints ask of a pruning policy.

    Implement it to prune another way: ``rule`` decides an epoch from the previous epoch's
    snapshot; the rest lets a run plan its steps before any score exists and refuse a
    checkpoint or store made with other settings.

    >>> policy: PruningPolicy = InfoBatchPolicy(num_epochs=10, prune_ratio=0.3)
    >>> policy.annealing_start, policy.anneals(9), policy.settings()["prune_ratio"]
    (8, True, 0.3)
    """

    @property
    def prune_ratio(self) -> float:
        """The chance a candidate is dropped (plans use it before any score exists)."""
        ...

    @property
    def annealing_start(self) -> int:
        """The first epoch that trains on all data with weight 1."""
        ...

    def anneals(self, epoch: int) -> bool:
        """Whether ``epoch`` trains on all data with weight 1."""
        ...

    def rule(self, epoch: int, snapshot: ScoreSnapshot) -> EpochRule:
        """The rule deciding every sample of ``epoch`` from the snapshot of ``epoch - 1``."""
        ...

    def settings(self) -> dict[str, Any]:
        """JSON-able values that determine every decision (a run refuses others)."""
        ...


@dataclass(frozen=True)
class _ScheduledPolicy:
    """Fields and checks shared by the built-in policies: prune until annealing starts."""

    num_epochs: int
    prune_ratio: float = 0.5
    delta: float = 0.875
    seed: int = 0

    def __post_init__(self) -> None:
        check_prune_ratio(self.prune_ratio)
        check_seed(self.seed)
        annealing_start(self.num_epochs, self.delta)

    @property
    def annealing_start(self) -> int:
        """The first epoch that trains on all data with weight 1."""
        return annealing_start(self.num_epochs, self.delta)

    def anneals(self, epoch: int) -> bool:
        """Whether ``epoch`` trains on all data with weight 1."""
        return epoch >= self.annealing_start

    def settings(self) -> dict[str, Any]:
        """The policy's name and fields: every decision follows from them."""
        return {"policy": type(self).__name__, "num_epochs": self.num_epochs,
                "prune_ratio": self.prune_ratio, "delta": self.delta, "seed": self.seed}


@dataclass(frozen=True)
class InfoBatchPolicy(_ScheduledPolicy):
    """InfoBatch's soft pruning with annealing (the default policy).

    >>> InfoBatchPolicy(num_epochs=10).rule(3, store.snapshot(2))   # doctest: +SKIP
    EpochRule(epoch=3, seed=0, threshold=1.87, drop_probability=0.5, ..., kept_weight=2.0)
    """

    def rule(self, epoch: int, snapshot: ScoreSnapshot) -> EpochRule:
        if self.anneals(epoch) or snapshot.mean is None or self.prune_ratio == 0:
            return EpochRule(epoch, self.seed, None, 0.0)
        return EpochRule(epoch, self.seed, float(snapshot.mean), self.prune_ratio,
                         "below_threshold", 1.0 / (1.0 - self.prune_ratio))


@dataclass(frozen=True)
class RandomPolicy(_ScheduledPolicy):
    """Uniform random pruning of known samples at InfoBatch's expected budget (a baseline).

    Every known sample is dropped with probability ``r * P(score < mean)``, so an epoch keeps
    as many samples as InfoBatch would, on average; kept samples have weight 1.
    """

    def rule(self, epoch: int, snapshot: ScoreSnapshot) -> EpochRule:
        if self.anneals(epoch) or not len(snapshot):
            return EpochRule(epoch, self.seed, None, 0.0, "known")
        below = np.count_nonzero(snapshot.scores < np.float64(snapshot.mean)) / len(snapshot)
        return EpochRule(epoch, self.seed, None, self.prune_ratio * below, "known", 1.0)


# The built-in policies by the names ``InfoBatch(policy=...)`` takes.
POLICIES: dict[str, type] = {"infobatch": InfoBatchPolicy, "random": RandomPolicy}

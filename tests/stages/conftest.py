"""Fixtures of the stage tests: a large committed store, and webdataset shards on disk."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import infobatch_stream as ibs

from .helpers import fill_store, keys_of, write_shards


@dataclass
class BigStore:
    """100k known keys with right-skewed scores (like losses), committed as epoch 0,
    and 10k keys the store has never seen."""

    url: str
    known: list[str]
    unseen: list[str]
    scores: dict[str, float]

    def open(self, cache_dir: str) -> ibs.ScoreStore:
        return ibs.ScoreStore(self.url, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def big_store(tmp_path_factory) -> BigStore:
    root = tmp_path_factory.mktemp("big-store")
    known = keys_of(100_000)
    unseen = keys_of(10_000, prefix="new-")
    values = np.random.default_rng(7).lognormal(0.0, 0.75, len(known)).astype(np.float32)
    scores = dict(zip(known, values.tolist(), strict=True))
    store = ibs.ScoreStore(str(root / "scores"), cache_dir=str(root / "cache"))
    fill_store(store, scores, epoch=0)
    return BigStore(store.url, known, unseen, scores)


@dataclass
class Shards:
    """webdataset shards written by ``ShardWriter`` (uneven sizes) and a store that knows
    90% of their keys (epoch 0 committed)."""

    paths: list[str]
    keys: list[str]
    counts: list[int]
    store_url: str
    scores: dict[str, float]

    def store(self, cache_dir: str) -> ibs.ScoreStore:
        """The shared store, for reading only."""
        return ibs.ScoreStore(self.store_url, cache_dir=cache_dir)

    def private_store(self, directory: Path, cache_dir: str) -> ibs.ScoreStore:
        """A copy of the store that a test may commit to."""
        shutil.copytree(self.store_url, directory / "scores")
        return ibs.ScoreStore(str(directory / "scores"), cache_dir=cache_dir)


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Shards:
    root = tmp_path_factory.mktemp("shards")
    paths, keys, counts = write_shards(root / "data", 2400)
    rng = np.random.default_rng(3)
    known = [k for i, k in enumerate(keys) if i % 10]
    scores = dict(zip(known, rng.exponential(1.0, len(known)).astype(np.float32).tolist(), strict=True))
    store = ibs.ScoreStore(str(root / "scores"), cache_dir=str(root / "cache"))
    fill_store(store, scores, epoch=0)
    return Shards(paths, keys, counts, store.url, scores)

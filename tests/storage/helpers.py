"""Reference models and small tools shared by the store's tests.

The reference never uses the store's code: hashes come from ``xxhash`` directly, and
"last write wins" is computed by a different method (``np.unique`` on the reversed writes)
than the store's stable sort.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

REPO = Path(__file__).resolve().parents[2]
S3_ENV_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


def key_strings(start: int, stop: int, prefix: str = "sample-") -> list[str]:
    """The key strings of samples ``start .. stop-1`` (as a webdataset ``__key__`` would be)."""
    return [f"{prefix}{i:07d}" for i in range(start, stop)]


def ref_hashes(keys: list[str]) -> np.ndarray:
    """xxh3_64 of each key's UTF-8 bytes, computed without the store's code."""
    return np.array([xxhash.xxh3_64_intdigest(k.encode("utf-8")) for k in keys], np.uint64)


class Reference:
    """What a store must hold: per sample index, its last score and the epoch that wrote it.

    ``write`` applies one flushed batch of updates (indices into the sample universe); within
    one batch the last occurrence of an index wins, and later batches override earlier ones.
    """

    def __init__(self, hashes: np.ndarray):
        self.hashes = hashes
        self.scores = np.full(len(hashes), np.nan, np.float32)
        self.epochs = np.zeros(len(hashes), np.uint32)
        self.writes: dict[int, int] = {}   # epoch -> number of finite updates
        self.touched: dict[int, set] = {}  # epoch -> indices updated

    def write(self, epoch: int, idx: np.ndarray, scores: np.ndarray) -> None:
        idx = np.asarray(idx)
        scores = np.asarray(scores, np.float32)
        finite = np.isfinite(scores)
        idx, scores = idx[finite], scores[finite]
        # last occurrence of each index: the first occurrence in the reversed batch
        uniq, first_in_reversed = np.unique(idx[::-1], return_index=True)
        self.scores[uniq] = scores[::-1][first_in_reversed]
        self.epochs[uniq] = epoch
        self.writes[epoch] = self.writes.get(epoch, 0) + len(idx)
        self.touched.setdefault(epoch, set()).update(uniq.tolist())

    def copy(self) -> Reference:
        other = Reference(self.hashes)
        other.scores = self.scores.copy()
        other.epochs = self.epochs.copy()
        other.writes = dict(self.writes)
        other.touched = {k: set(v) for k, v in self.touched.items()}
        return other

    @property
    def known(self) -> np.ndarray:
        return ~np.isnan(self.scores)

    def mean(self) -> float:
        return float(np.mean(self.scores[self.known].astype(np.float64)))

    def duplicates(self, epoch: int) -> int:
        return self.writes.get(epoch, 0) - len(self.touched.get(epoch, ()))

    def sorted_columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(hash, score, epoch) of the known samples, sorted by hash: a snapshot's columns."""
        known = np.flatnonzero(self.known)
        order = known[np.argsort(self.hashes[known])]
        return self.hashes[order], self.scores[order], self.epochs[order]


def assert_snapshot_matches(snap: Any, ref: Reference, unknown_hashes: np.ndarray | None = None) -> None:
    """Every known sample's lookup is exact, unknown ones are NaN, and the columns, length and
    mean are the reference's."""
    got = snap.lookup(ref.hashes)
    known = ref.known
    assert np.array_equal(np.isnan(got), ~known), "known/unknown samples differ from the reference"
    assert np.array_equal(got[known], ref.scores[known]), "a score differs from the reference"
    assert len(snap) == int(known.sum())
    hashes, scores, epochs = ref.sorted_columns()
    table = snap.to_arrow()
    assert np.array_equal(table.column("hash").to_numpy(), hashes)
    assert np.array_equal(table.column("score").to_numpy(), scores)
    assert np.array_equal(table.column("epoch").to_numpy(), epochs)
    if len(hashes):
        assert snap.mean == pytest_approx(ref.mean())
    else:
        assert snap.mean is None
    if unknown_hashes is not None:
        assert np.isnan(snap.lookup(unknown_hashes)).all()


def pytest_approx(value: float) -> Any:
    import pytest

    return pytest.approx(value, rel=1e-12, abs=0)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment for a child interpreter that imports ``tests.storage`` helpers."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def run_python(script: str | Path, *args: str, env: dict[str, str] | None = None,
               timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess:
    """Run a Python script in a fresh interpreter (this one's), from the repository root."""
    full_env = child_env(env)
    proc = subprocess.run([sys.executable, str(script), *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout, input=input)
    if proc.returncode != 0:
        raise AssertionError(f"{script} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def write_json(path: Path, data: dict) -> str:
    path.write_text(json.dumps(data))
    return str(path)

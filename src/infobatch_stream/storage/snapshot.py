"""ScoreSnapshot: every known score after one committed epoch, memory-mapped, with lookups.

A snapshot file is sorted by key hash. Key hashes are uniform, so a small prefix table
(the start row of every ``k``-bit hash prefix, ~64 rows per entry) narrows a lookup to a
handful of rows; a vectorized bisection over those few rows then finds the key. That costs
two or three cache misses per key instead of the ~20 of a binary search over the whole
file, and the table (4 bytes per 64 keys) is the only private memory a reader adds: the
file's pages are shared by every process of the machine through the page cache.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa

from .keys import hash_keys
from .tables import SNAPSHOT_SCHEMA, TableFile, open_table_file

# Rows per prefix-table entry: a lookup bisects about this many rows. A denser table costs
# private memory in every worker for little speed (docs/benchmark-findings.md).
_ROWS_PER_PREFIX = 64
_TABLE_SLICE = 1 << 11  # temporaries of 16 KB: less for malloc to keep in a worker's heap
_SMALL_QUERY = 16  # below this many keys a plain binary search has less overhead


def _check_sums(table: TableFile, rows: int) -> float | None:
    """The snapshot's stored mean, once its stored sum is checked against its scores (the
    column checksum does not cover the metadata, and the mean is every epoch's threshold)."""
    mean, stored = table.meta.get("mean"), table.meta.get("score_sum", 0.0)
    for name, value in (("mean", mean), ("score_sum", stored)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"metadata {name!r} must be a number, got {value!r}")
    if (mean is None) != (rows == 0):
        raise ValueError("its mean does not match its row count")
    if rows and mean != stored / rows:
        raise ValueError(f"its mean {mean} is not its score sum {stored} over {rows} keys")
    # Summed in another order than the merge's: equal up to rounding, which scales with the
    # sum of magnitudes (read only when the sum itself is not close enough: scores of mixed
    # signs may cancel).
    gap = abs(table.score_sum - stored)
    if gap > 1e-9 * abs(stored) and gap > 1e-9 * table.score_magnitude():
        raise ValueError(f"its scores sum to {table.score_sum}, its metadata says {stored}")
    return None if mean is None else float(mean)


class ScoreSnapshot:
    """The scores of one committed epoch.

    >>> snap = store.snapshot()            # the latest committed epoch
    >>> snap.epoch, len(snap), snap.mean   # doctest: +SKIP
    (4, 1281167, 2.31)
    >>> snap.lookup(["n01440764_10026", "never-seen"])  # doctest: +SKIP
    array([1.93, nan], dtype=float32)
    """

    def __init__(self, epoch: int | None, hashes: np.ndarray, scores: np.ndarray,
                 epochs: np.ndarray, mean: float | None, path: str | None = None,
                 batch: pa.RecordBatch | None = None, digest: str | None = None):
        self.epoch = epoch
        self.digest = digest
        self.hashes = hashes
        self.scores = scores
        self.epochs = epochs
        self.mean = mean
        self.path = path
        self._batch = batch
        self.file: TableFile | None = None
        self._table: np.ndarray | None = None  # built by the first batched lookup
        self._bits = 0

    @classmethod
    def empty(cls) -> ScoreSnapshot:
        """The snapshot of a store with no committed epoch: no keys, no mean."""
        return cls(None, np.empty(0, np.uint64), np.empty(0, np.float32),
                   np.empty(0, np.uint32), None)

    @classmethod
    def open(cls, path: str, epoch: int) -> ScoreSnapshot:
        """Map a local snapshot file; ValueError says what is wrong with a damaged one."""
        table = open_table_file(path, SNAPSHOT_SCHEMA, "snapshot", max_epoch=epoch)
        if table.meta.get("epoch") != epoch:
            raise ValueError(f"holds epoch {table.meta.get('epoch')}, expected {epoch}")
        mean = _check_sums(table, len(table.columns["hash"]))
        snap = cls(epoch, table.columns["hash"], table.columns["score"], table.columns["epoch"],
                   mean, path, table.batch, table.meta["digest"])
        snap.file = table  # lets a commit read it in ranges instead of through the mapping
        return snap

    def __len__(self) -> int:
        return int(self.hashes.shape[0])

    def __repr__(self) -> str:
        return f"ScoreSnapshot(epoch={self.epoch}, keys={len(self)}, mean={self.mean})"

    def _build_prefix_table(self) -> None:
        rows = len(self)
        bits = 0 if rows < 2 * _ROWS_PER_PREFIX else min(26, int(math.log2(rows / _ROWS_PER_PREFIX)))
        self._shift = np.uint64(64 - bits)
        index_type = np.int32 if rows < 2**31 else np.int64
        table = np.empty((1 << bits) + 1, index_type)
        table[-1] = rows
        # In slices, so that building it needs no temporaries the size of the table: in a
        # DataLoader worker the table is the only private memory a snapshot costs.
        for lo in range(0, 1 << bits, _TABLE_SLICE):
            hi = min(lo + _TABLE_SLICE, 1 << bits)
            prefixes = np.arange(lo, hi, dtype=np.uint64) << self._shift if bits else np.zeros(1, np.uint64)
            table[lo:hi] = np.searchsorted(self.hashes, prefixes)
        # Only once the whole table is built: a slice's last bucket ends at the next slice's
        # first entry.
        widest = max(int(np.max(np.diff(table[lo:lo + _TABLE_SLICE + 1])))
                     for lo in range(0, 1 << bits, _TABLE_SLICE))
        self._table = table
        self._bits = bits
        self._steps = widest.bit_length()

    def positions(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row of each hash, whether it is present) for a uint64 array of key hashes."""
        rows = len(self)
        if rows == 0:
            return np.zeros(len(hashes), np.int64), np.zeros(len(hashes), bool)
        if self._table is None and len(hashes) >= _SMALL_QUERY:
            # Built on first use: building it touches every page of the hash column, which a
            # commit (that reads the snapshot once, from the file) must not keep resident.
            self._build_prefix_table()
        if len(hashes) < _SMALL_QUERY or self._bits == 0:
            pos = np.searchsorted(self.hashes, hashes)
        else:
            # A branchless lower bound over the 2**steps - 1 rows from each bucket's start,
            # which covers the widest bucket. Rows past a bucket's end belong to larger
            # prefixes (never < the key), and a probe past the file's end is clipped to its
            # last row, so a key's answer stays exact; two numpy calls per step, not six.
            pos = self._table[(hashes >> self._shift).astype(np.intp)].astype(np.intp)
            step = (1 << self._steps) >> 1
            while step:
                pos += (self.hashes.take(pos + (step - 1), mode="clip") < hashes) * step
                step >>= 1
        clipped = np.minimum(pos, rows - 1)
        return clipped, self.hashes[clipped] == hashes

    def lookup(self, keys: Any) -> np.ndarray:
        """The last score (float32) of each key; NaN for a key this snapshot has never seen.

        ``keys``: strings, bytes, or precomputed uint64 hashes (see ``hash_keys``).
        """
        hashes = hash_keys(keys)
        pos, found = self.positions(hashes)
        out = np.full(len(hashes), np.nan, np.float32)
        out[found] = self.scores[pos[found]]
        return out

    def to_arrow(self) -> pa.Table:
        """The snapshot as an Arrow table (hash, score, epoch), without a copy."""
        if self._batch is not None:
            return pa.Table.from_batches([self._batch])
        return pa.table({"hash": self.hashes, "score": self.scores, "epoch": self.epochs},
                        schema=SNAPSHOT_SCHEMA)

"""The commit's merge: previous snapshot + an epoch's deltas -> the next snapshot file.

Every input is sorted by key hash, so the merge walks the hash space in ranges of ~256K
rows: for each range it takes the matching slice of the snapshot and of every delta
(memory-mapped), resolves duplicates (last write wins: deltas are given in write order and
the sort is stable), overlays the updates on the old scores and appends the result to the
output columns. Working memory is one range; the output columns (16 bytes per key) are the
only thing that grows with the store, and they are allocated untouched, so the pages of an
upper bound that is never reached are never used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .snapshot import ScoreSnapshot
from .tables import DELTA_SCHEMA, SNAPSHOT_SCHEMA, TableFile, open_table_file, write_table_file
from .writer import last_write_wins

_ROWS_PER_RANGE = 1 << 18


@dataclass
class MergeResult:
    rows: int
    score_sum: float
    updated: int
    new_keys: int
    duplicates: int
    rejected_nonfinite: int
    digest: str


def open_delta(path: str, epoch: int) -> TableFile:
    """Map and check one delta file of ``epoch``; ValueError says what is wrong with it."""
    delta = open_table_file(path, DELTA_SCHEMA, "delta")
    if delta.meta.get("epoch") != epoch:
        raise ValueError(f"holds updates of epoch {delta.meta.get('epoch')}, expected {epoch}")
    return delta


def _range_starts(hashes: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    starts = np.empty(len(bounds) + 2, np.intp)
    starts[0] = 0
    starts[1:-1] = np.searchsorted(hashes, bounds)
    starts[-1] = len(hashes)
    return starts


def merge_snapshot(previous: ScoreSnapshot, deltas: list[TableFile], epoch: int, out_path: str,
                   ) -> MergeResult:
    """Write the snapshot of ``epoch`` to the local file ``out_path``; deltas in write order."""
    upper = len(previous) + sum(len(d.columns["hash"]) for d in deltas)
    ranges = max(1, -(-upper // _ROWS_PER_RANGE))
    # Interior range boundaries, evenly spaced over the 64-bit hash space.
    bounds = np.array([(i << 64) // ranges for i in range(1, ranges)], np.uint64)
    old_starts = _range_starts(previous.hashes, bounds)
    delta_starts = [_range_starts(d.columns["hash"], bounds) for d in deltas]

    out_hash = np.empty(upper, np.uint64)
    out_score = np.empty(upper, np.float32)
    out_epoch = np.empty(upper, np.uint32)
    rows = 0
    score_sum = 0.0
    updated = new_keys = 0
    duplicates = sum(int(d.meta.get("duplicates", 0)) for d in deltas)
    rejected = sum(int(d.meta.get("rejected_nonfinite", 0)) for d in deltas)

    for r in tqdm(range(ranges), desc=f"commit epoch {epoch}", unit="range", leave=False,
                  disable=None if upper > 5_000_000 else True):
        lo, hi = old_starts[r], old_starts[r + 1]
        old_hash = previous.hashes[lo:hi]
        parts = [(d.columns["hash"][s[r]:s[r + 1]], d.columns["score"][s[r]:s[r + 1]])
                 for d, s in zip(deltas, delta_starts)]
        new_hash = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.uint64)
        new_score = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, np.float32)
        new_hash, new_score, dups = last_write_wins(new_hash, new_score)
        duplicates += dups
        updated += len(new_hash)

        pos = np.searchsorted(old_hash, new_hash)
        present = pos < len(old_hash)
        present[present] = old_hash[pos[present]] == new_hash[present]
        score = previous.scores[lo:hi].copy()
        last_epoch = previous.epochs[lo:hi].copy()
        score[pos[present]] = new_score[present]
        last_epoch[pos[present]] = epoch
        absent = ~present
        insert_at = pos[absent]
        new_keys += len(insert_at)
        merged_hash = np.insert(old_hash, insert_at, new_hash[absent])
        merged_score = np.insert(score, insert_at, new_score[absent])
        merged_epoch = np.insert(last_epoch, insert_at, np.uint32(epoch))

        n = len(merged_hash)
        out_hash[rows:rows + n] = merged_hash
        out_score[rows:rows + n] = merged_score
        out_epoch[rows:rows + n] = merged_epoch
        score_sum += float(merged_score.sum(dtype=np.float64))
        rows += n

    mean = score_sum / rows if rows else None
    meta = {"kind": "snapshot", "epoch": epoch, "mean": mean, "score_sum": score_sum}
    columns = [out_hash[:rows], out_score[:rows], out_epoch[:rows]]
    digest = write_table_file(out_path, SNAPSHOT_SCHEMA, columns, meta)
    return MergeResult(rows, score_sum, updated, new_keys, duplicates, rejected, digest)

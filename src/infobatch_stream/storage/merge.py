"""The commit's merge: previous snapshot + an epoch's deltas -> the next snapshot file.

Every input is sorted by key hash, so the merge walks the hash space in ranges of ~256K
rows: for each range it reads the matching rows of the snapshot and of every delta from
their files (not through their memory maps, which would leave every input resident in the
committing process), resolves duplicates (last write wins: deltas are given in write order
and the sort is stable), overlays the updates on the old scores and appends the result to
the output columns. Working memory is one range; the output columns (16 bytes per key) are
the only thing that grows with the store, and they are allocated untouched, so the pages of
an upper bound that is never reached are never used.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .layout import DeltaName
from .snapshot import ScoreSnapshot
from .tables import DELTA_SCHEMA, SNAPSHOT_SCHEMA, TableFile, open_table_file, write_table_file
from .writer import last_write_wins

_ROWS_PER_RANGE = 1 << 18
_ROWS_PER_SCAN = 1 << 20


@dataclass
class MergeResult:
    rows: int
    score_sum: float
    updated: int
    new_keys: int
    duplicates: int
    rejected_nonfinite: int
    digest: str


def open_delta(path: str, epoch: int, name: DeltaName | None = None) -> TableFile:
    """Map and check one delta file of ``epoch``; ValueError says what is wrong with it.

    Beyond its checksum: key hashes sorted and unique, scores finite, counters non-negative
    integers, and the incarnation its name gives (``name``) the one it holds.
    """
    delta = open_table_file(path, DELTA_SCHEMA, "delta")
    meta = delta.meta
    if meta.get("epoch") != epoch:
        raise ValueError(f"holds updates of epoch {meta.get('epoch')}, expected {epoch}")
    for counter in ("duplicates", "rejected_nonfinite", "incarnation", "seq", "rank"):
        value = meta.get(counter, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"metadata {counter!r} must be a non-negative integer, got {value!r}")
    run_id = meta.get("run_id")
    if run_id is not None and not isinstance(run_id, str):
        raise ValueError(f"metadata 'run_id' must be a string, got {run_id!r}")
    if name is not None and meta.get("incarnation", 0) != name.incarnation:
        raise ValueError(f"holds incarnation {meta.get('incarnation', 0)}, its name says "
                         f"{name.incarnation}")
    return delta


def _range_starts(rows, count: int, bounds: np.ndarray) -> np.ndarray:
    """The first row of each range: [0, lower bound of each of ``bounds``, count].

    The hash column is read in chunks through ``rows`` rather than searched in place: a binary
    search over a memory map faults in (and keeps resident) 64 KB around every probe.
    """
    starts = np.full(len(bounds) + 2, count, np.intp)
    starts[0] = 0
    pending = np.ones(len(bounds), bool)
    for lo in range(0, count, _ROWS_PER_SCAN):
        chunk = rows("hash", lo, min(count, lo + _ROWS_PER_SCAN))
        pos = np.searchsorted(chunk, bounds)
        found = pending & (pos < len(chunk))  # the first chunk holding a hash >= the bound
        starts[1:-1][found] = lo + pos[found]
        pending &= ~found
        if not pending.any():
            break
    return starts


def _row_reader(table: TableFile | None, columns: dict[str, np.ndarray], stack: ExitStack):
    """``rows(name, lo, hi)`` of a table: read from its file when it has one (pages read are
    not kept resident, as mapped pages would be), else sliced from the arrays."""
    if table is None or table.path is None:
        return lambda name, lo, hi: columns[name][lo:hi]
    fd = os.open(table.path, os.O_RDONLY)
    stack.callback(os.close, fd)
    return lambda name, lo, hi: table.read_rows(fd, name, lo, hi) if hi > lo else columns[name][:0]


class _Output:
    """The growing output columns and the figures of the merge so far."""

    def __init__(self, upper: int, epoch: int):
        self.hash = np.empty(upper, np.uint64)
        self.score = np.empty(upper, np.float32)
        self.epoch_col = np.empty(upper, np.uint32)
        self.epoch = epoch
        self.rows = 0
        self.score_sum = 0.0
        self.new_keys = 0

    def overlay(self, old_rows, lo: int, hi: int, new_hash: np.ndarray, new_score: np.ndarray) -> None:
        """Append the old rows ``lo:hi`` with the range's updates laid over them.

        The old rows are read straight into the output; when the epoch brings no new key in
        this range (every epoch after the first, usually) they stay there and the updates
        are scattered over them.
        """
        rows, epoch = self.rows, self.epoch
        end = rows + (hi - lo)
        self.hash[rows:end] = old_rows("hash", lo, hi)
        old_hash = self.hash[rows:end]
        pos = np.searchsorted(old_hash, new_hash)
        present = pos < len(old_hash)
        present[present] = old_hash[pos[present]] == new_hash[present]
        if present.all():
            self.score[rows:end] = old_rows("score", lo, hi)
            self.epoch_col[rows:end] = old_rows("epoch", lo, hi)
            self.score[rows + pos] = new_score
            self.epoch_col[rows + pos] = epoch
        else:
            score = np.array(old_rows("score", lo, hi))  # a private, writable copy
            last_epoch = np.array(old_rows("epoch", lo, hi))
            score[pos[present]] = new_score[present]
            last_epoch[pos[present]] = epoch
            absent = ~present
            insert_at = pos[absent]
            self.new_keys += len(insert_at)
            merged_hash = np.insert(old_hash, insert_at, new_hash[absent])
            end = rows + len(merged_hash)
            self.hash[rows:end] = merged_hash
            self.score[rows:end] = np.insert(score, insert_at, new_score[absent])
            self.epoch_col[rows:end] = np.insert(last_epoch, insert_at, np.uint32(epoch))
        self.score_sum += float(self.score[rows:end].sum(dtype=np.float64))
        self.rows = end


def _range_updates(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, int]:
    """One range's updates from every delta, one per key, last write winning: (hash, score, dups)."""
    if len(parts) == 1:  # one delta file: already sorted, one row per key
        return parts[0][0], parts[0][1], 0
    new_hash = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.uint64)
    new_score = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, np.float32)
    return last_write_wins(new_hash, new_score)


def merge_snapshot(previous: ScoreSnapshot, deltas: list[TableFile], epoch: int, out_path: str,
                   ) -> MergeResult:
    """Write the snapshot of ``epoch`` to the local file ``out_path``; deltas in write order."""
    upper = len(previous) + sum(len(d.columns["hash"]) for d in deltas)
    ranges = max(1, -(-upper // _ROWS_PER_RANGE))
    # Interior range boundaries, evenly spaced over the 64-bit hash space.
    bounds = np.array([(i << 64) // ranges for i in range(1, ranges)], np.uint64)
    out = _Output(upper, epoch)
    updated = 0
    duplicates = sum(int(d.meta.get("duplicates", 0)) for d in deltas)
    rejected = sum(int(d.meta.get("rejected_nonfinite", 0)) for d in deltas)

    with ExitStack() as stack:
        old_rows = _row_reader(previous.file, {"hash": previous.hashes, "score": previous.scores,
                                               "epoch": previous.epochs}, stack)
        delta_rows = [_row_reader(d, d.columns, stack) for d in deltas]
        old_starts = _range_starts(old_rows, len(previous), bounds)
        delta_starts = [_range_starts(read, len(d.columns["hash"]), bounds)
                        for read, d in zip(delta_rows, deltas, strict=True)]
        for r in tqdm(range(ranges), desc=f"commit epoch {epoch}", unit="range", leave=False,
                      disable=None if upper > 5_000_000 else True):
            parts = [(read("hash", s[r], s[r + 1]), read("score", s[r], s[r + 1]))
                     for read, s in zip(delta_rows, delta_starts, strict=True) if s[r + 1] > s[r]]
            new_hash, new_score, dups = _range_updates(parts)
            duplicates += dups
            updated += len(new_hash)
            out.overlay(old_rows, int(old_starts[r]), int(old_starts[r + 1]), new_hash, new_score)

    rows, score_sum = out.rows, out.score_sum
    mean = score_sum / rows if rows else None
    meta = {"kind": "snapshot", "epoch": epoch, "mean": mean, "score_sum": score_sum}
    columns = [out.hash[:rows], out.score[:rows], out.epoch_col[:rows]]
    digest = write_table_file(out_path, SNAPSHOT_SCHEMA, columns, meta)
    return MergeResult(rows, score_sum, updated, out.new_keys, duplicates, rejected, digest)

"""The commit's merge with tiny ranges and scan chunks, so that every boundary case of the
range walk (empty ranges, a range start found in a later chunk, inputs in memory or read from
their files) is exercised on small data."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infobatch_stream.storage import ScoreSnapshot, merge

from .conftest import Backend
from .helpers import Reference, assert_snapshot_matches, key_strings, ref_hashes


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), unique=True, max_size=60),
       st.lists(st.integers(0, 2**64 - 1), max_size=12), st.integers(1, 9))
def test_range_starts_are_lower_bounds(values, bounds, scan) -> None:
    hashes = np.array(sorted(values), np.uint64)
    bounds = np.array(sorted(bounds), np.uint64)
    original = merge._ROWS_PER_SCAN
    merge._ROWS_PER_SCAN = scan  # read the column a few rows at a time
    try:
        starts = merge._range_starts(lambda name, lo, hi: hashes[lo:hi], len(hashes), bounds)
    finally:
        merge._ROWS_PER_SCAN = original
    assert starts.tolist() == [0, *np.searchsorted(hashes, bounds).tolist(), len(hashes)]


@pytest.mark.parametrize(("range_rows", "scan_rows"), [(4, 3), (64, 1000), (1 << 18, 1 << 20)])
def test_merges_with_any_range_size_are_exact(local_backend: Backend, monkeypatch,
                                              range_rows: int, scan_rows: int) -> None:
    monkeypatch.setattr(merge, "_ROWS_PER_RANGE", range_rows)
    monkeypatch.setattr(merge, "_ROWS_PER_SCAN", scan_rows)
    store = local_backend.open()
    ref = Reference(ref_hashes(key_strings(0, 600)))
    rng = np.random.default_rng(range_rows)
    for epoch in range(3):
        for rank in range(2):
            idx = rng.choice(600, 250, replace=True)  # repeats within a flush too
            scores = rng.random(250).astype(np.float32)
            with store.writer(epoch, rank=rank) as writer:
                writer.record(ref.hashes[idx], scores)
            ref.write(epoch, idx, scores)
        manifest = store.commit(epoch)
        assert manifest.duplicates == ref.duplicates(epoch)
        assert_snapshot_matches(local_backend.open().snapshot(epoch), ref)


def test_a_previous_snapshot_held_in_memory(local_backend: Backend, tmp_path, monkeypatch) -> None:
    """merge_snapshot also takes a snapshot that is not backed by a file (no ``file``)."""
    monkeypatch.setattr(merge, "_ROWS_PER_RANGE", 8)
    hashes = np.array([5, 10, 2**63, 2**64 - 1], np.uint64)
    previous = ScoreSnapshot(0, hashes, np.array([1, 2, 3, 4], np.float32),
                             np.zeros(4, np.uint32), 2.5)
    store = local_backend.open()
    writer = store.writer(1)
    writer.record(np.array([10, 7, 2**64 - 1], np.uint64), [20.0, 70.0, 40.0])
    writer.flush()
    deltas = [merge.open_delta(local_backend.path(p), 1) for p in store.pending_deltas(1)]
    result = merge.merge_snapshot(previous, deltas, 1, str(tmp_path / "out.arrow"))
    assert (result.rows, result.updated, result.new_keys) == (5, 3, 1)
    out = ScoreSnapshot.open(str(tmp_path / "out.arrow"), 1)
    assert out.hashes.tolist() == [5, 7, 10, 2**63, 2**64 - 1]
    assert out.scores.tolist() == [1.0, 70.0, 20.0, 3.0, 40.0]
    assert out.epochs.tolist() == [0, 1, 1, 0, 1]
    assert out.mean == pytest.approx(134.0 / 5, rel=1e-12)
    assert previous.scores.tolist() == [1, 2, 3, 4]  # inputs are never written to

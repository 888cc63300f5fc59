"""ScoreSnapshot lookups (exact for every key, NaN for unknown ones, whatever the distribution
of hashes) and what a snapshot promises: memory-mapped, zero-copy to Arrow, fresh on reopen."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infobatch_stream.storage import ScoreSnapshot, hash_keys

from .conftest import Backend
from .helpers import key_strings

U64 = st.integers(min_value=0, max_value=2**64 - 1)


def snapshot_of(hashes: np.ndarray, seed: int = 0) -> tuple[ScoreSnapshot, dict[int, float]]:
    hashes = np.unique(np.asarray(hashes, np.uint64))
    scores = np.random.default_rng(seed).random(len(hashes)).astype(np.float32)
    mean = float(scores.astype(np.float64).mean()) if len(hashes) else None
    snap = ScoreSnapshot(0, hashes, scores, np.zeros(len(hashes), np.uint32), mean)
    return snap, dict(zip(hashes.tolist(), scores.tolist(), strict=True))


def check_lookups(snap: ScoreSnapshot, truth: dict[int, float], queries: np.ndarray) -> None:
    got = snap.lookup(queries)
    expected = np.array([truth.get(q, np.nan) for q in queries.tolist()], np.float32)
    assert got.dtype == np.float32 and got.shape == queries.shape
    assert np.array_equal(got, expected, equal_nan=True)
    pos, found = snap.positions(queries)
    assert found.tolist() == [q in truth for q in queries.tolist()]
    assert np.array_equal(snap.hashes[pos[found]], queries[found])


@st.composite
def hash_sets(draw) -> np.ndarray:
    """Uniform hashes, hashes crowded under one prefix (a bucket far wider than the typical),
    and the extremes of the range."""
    uniform = draw(st.lists(U64, max_size=400))
    top = draw(st.integers(0, 2**12 - 1))
    crowded = draw(st.lists(st.integers(0, 2**20 - 1), max_size=300))
    extremes = draw(st.lists(st.sampled_from([0, 1, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1]),
                             max_size=6))
    values = uniform + [(top << 52) | c for c in crowded] + extremes
    return np.array(values, np.uint64)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hash_sets(), st.lists(U64, max_size=40), st.data())
def test_lookups_are_exact_for_any_hash_distribution(hashes, absent, data) -> None:
    snap, truth = snapshot_of(hashes)
    present = list(truth)
    chosen = data.draw(st.lists(st.sampled_from(present), max_size=60)) if present else []
    near = [min(h + 1, 2**64 - 1) for h in chosen[:20]] + [max(h - 1, 0) for h in chosen[:20]]
    queries = np.array(chosen + absent + near, np.uint64)
    check_lookups(snap, truth, queries)           # the batched path (>= 16 keys)
    for q in queries[:12]:                        # the small-query path, one key at a time
        check_lookups(snap, truth, np.array([q], np.uint64))


def test_a_large_snapshot_with_every_hash_in_one_bucket() -> None:
    rng = np.random.default_rng(1)
    crowded = (np.uint64(0xABCDE) << np.uint64(44)) | rng.integers(0, 2**44, 200_000, dtype=np.uint64)
    uniform = rng.integers(0, 2**64 - 1, 100_000, dtype=np.uint64, endpoint=True)
    snap, truth = snapshot_of(np.concatenate([crowded, uniform]))
    queries = np.concatenate([snap.hashes[::3], crowded[:5000] + np.uint64(1),
                              rng.integers(0, 2**64 - 1, 5000, dtype=np.uint64, endpoint=True)])
    got = snap.lookup(queries)
    expected = np.array([truth.get(q, np.nan) for q in queries.tolist()], np.float32)
    assert np.array_equal(got, expected, equal_nan=True)


def test_the_widest_bucket_at_the_end_of_a_table_slice_sets_the_search_depth() -> None:
    """The prefix table is built in slices; the widest bucket's size must be measured against
    the next slice's first entry once that is built (it was read from uninitialised memory:
    a too deep search made every lookup ~3x slower, a too shallow one would miss keys)."""
    from infobatch_stream.storage import snapshot as module

    rng = np.random.default_rng(2)
    bits = 14                                   # several slices of prefixes
    rows = module._ROWS_PER_PREFIX << bits
    uniform = rng.integers(0, 2**64 - 1, rows, dtype=np.uint64, endpoint=True)
    last_of_slice = np.uint64(module._TABLE_SLICE - 1) << np.uint64(64 - bits)
    crowded = last_of_slice | rng.integers(0, 2**(64 - bits), 700, dtype=np.uint64)
    snap, truth = snapshot_of(np.concatenate([uniform, crowded]))
    check_lookups(snap, truth, np.concatenate([crowded, crowded + np.uint64(1), uniform[:5000]]))
    assert snap._bits == bits
    starts = np.searchsorted(snap.hashes, np.arange(1 << bits, dtype=np.uint64) << np.uint64(64 - bits))
    widest = int(np.diff(np.append(starts, len(snap))).max())
    assert widest > 700 and snap._steps == widest.bit_length()


def test_the_empty_snapshot() -> None:
    snap = ScoreSnapshot.empty()
    assert len(snap) == 0 and snap.mean is None and snap.epoch is None
    assert np.isnan(snap.lookup(["a"] * 20)).all() and snap.lookup([]).shape == (0,)
    assert snap.to_arrow().num_rows == 0


def test_every_key_type_looks_up_the_same_score(local_backend: Backend) -> None:
    store = local_backend.open()
    keys = key_strings(0, 50)
    with store.writer(0) as writer:
        writer.record(keys, np.arange(50, dtype=np.float32))
    store.commit(0)
    snap = store.snapshot()
    hashes = hash_keys(keys)
    expected = np.arange(50, dtype=np.float32)
    for form in (keys, [k.encode() for k in keys], hashes, hashes.view(np.int64),
                 torch.from_numpy(hashes.view(np.int64)), np.array(keys)):
        assert np.array_equal(snap.lookup(form), expected)
    assert [float(snap.lookup([k])[0]) for k in keys[:5]] == [0.0, 1.0, 2.0, 3.0, 4.0]
    with pytest.raises(TypeError, match="single str"):
        snap.lookup("sample-0000001")
    with pytest.raises(TypeError, match="float"):
        snap.lookup([0.5])


def test_a_snapshot_is_memory_mapped_and_to_arrow_does_not_copy(local_backend: Backend) -> None:
    store = local_backend.open()
    with store.writer(0) as writer:
        writer.record(key_strings(0, 1000), np.ones(1000))
    store.commit(0)
    snap = store.snapshot()
    if os.path.exists("/proc/self/maps"):
        with open("/proc/self/maps") as maps:
            assert snap.path in maps.read()  # mapped, not read into private memory
    assert not snap.scores.flags.writeable  # a read-only view of the file
    table = snap.to_arrow()
    assert table.column("score").chunk(0).buffers()[1].address == snap.scores.ctypes.data
    assert table.column("hash").chunk(0).buffers()[1].address == snap.hashes.ctypes.data
    assert table.schema.names == ["hash", "score", "epoch"]


def test_a_store_object_sees_commits_made_by_others(backend: Backend) -> None:
    reader = backend.open()
    assert reader.latest_epoch is None
    writer_store = backend.open()
    with writer_store.writer(0) as writer:
        writer.record(["a"], [1.0])
    writer_store.commit(0)
    first = reader.snapshot()
    assert reader.latest_epoch == 0 and first.lookup(["a"]).tolist() == [1.0]
    assert reader.snapshot() is first  # the open snapshot is reused while it is the latest
    with writer_store.writer(1) as writer:
        writer.record(["a"], [2.0])
    writer_store.commit(1)
    assert reader.latest_epoch == 1
    assert reader.snapshot().lookup(["a"]).tolist() == [2.0]
    assert reader.snapshot(0).lookup(["a"]).tolist() == [1.0]
    assert first.lookup(["a"]).tolist() == [1.0]  # an open snapshot never changes under you

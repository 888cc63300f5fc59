"""DeltaWriter: what reaches the store (finite float32 scores, last write wins) and what is
counted on the way (rejected NaN/inf, duplicate updates)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pytest
import torch

from infobatch_stream.storage import hash_key

from .conftest import Backend


def delta_meta(backend: Backend, relpath: str) -> tuple[dict, pa.RecordBatch]:
    reader = pa.ipc.open_file(pa.BufferReader(backend.read(relpath)))
    return json.loads(reader.schema.metadata[b"infobatch_stream"]), reader.get_batch(0)


def test_nonfinite_scores_are_dropped_counted_and_never_in_the_mean(backend: Backend, caplog) -> None:
    store = backend.open()
    writer = store.writer(0, rank=0)
    with caplog.at_level(logging.WARNING, logger="infobatch_stream.storage.writer"):
        writer.record(["a", "b", "c", "d", "e"],
                      np.array([1.0, np.nan, np.inf, -np.inf, 3.0], np.float32))
        # beyond float32: becomes inf when narrowed, and is rejected like inf
        writer.record(["f", "g"], np.array([1e300, -1e300], np.float64))
    assert writer.rejected_nonfinite == 5
    assert "dropped" in caplog.text
    relpath = writer.flush()
    meta, batch = delta_meta(backend, relpath)
    assert meta["rejected_nonfinite"] == 5
    assert batch.num_rows == 2
    assert sorted(batch.column(0).to_pylist()) == sorted([hash_key("a"), hash_key("e")])
    assert writer.rejected_nonfinite == 0  # the count moved into the delta

    manifest = store.commit(0)
    assert manifest.rejected_nonfinite == 5
    assert manifest.keys == 2
    assert manifest.mean == 2.0
    snap = store.snapshot()
    assert snap.mean == 2.0
    got = snap.lookup(["a", "b", "c", "d", "e", "f", "g"])
    assert got[0] == 1.0 and got[4] == 3.0
    assert np.isnan(got[[1, 2, 3, 5, 6]]).all()  # never stored: unknown, not NaN scores


def test_nonfinite_update_keeps_the_old_score_and_a_flush_of_only_rejections_is_counted(
        backend: Backend) -> None:
    store = backend.open()
    with store.writer(0) as writer:
        writer.record(["a", "b"], [0.5, 1.5])
    store.commit(0)
    with store.writer(1) as writer:
        writer.record(["a"], [float("nan")])  # every row rejected: the delta still carries the count
    manifest = store.commit(1)
    assert manifest.rejected_nonfinite == 1
    assert manifest.updated == 0
    snap = store.snapshot(1)
    assert snap.lookup(["a", "b"]).tolist() == [0.5, 1.5]
    assert snap.mean == 1.0
    assert snap.epochs.tolist() == [0, 0]  # "a" was not updated in epoch 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_torch_scores_of_any_float_dtype(local_backend: Backend, dtype: torch.dtype) -> None:
    store = local_backend.open()
    scores = torch.tensor([0.1, 2.5, 1000.0, 3e-3], dtype=dtype)
    if dtype in (torch.float16, torch.bfloat16):
        scores.requires_grad_(False)
    with store.writer(0) as writer:
        writer.record(["a", "b", "c", "d"], scores)
        # a loss tensor that still needs grad is accepted too (detached)
        writer.record(["e"], torch.tensor([4.0], dtype=dtype, requires_grad=True) * 1)
    store.commit(0)
    expected = scores.to(torch.float32).numpy()
    got = store.snapshot().lookup(["a", "b", "c", "d", "e"])
    assert np.array_equal(got[:4], expected)  # exact: every fp16/bf16 value is a float32
    assert got[4] == 4.0


def test_fp16_overflow_is_rejected(local_backend: Backend) -> None:
    store = local_backend.open()
    writer = store.writer(0)
    writer.record(["a", "b"], torch.tensor([70000.0, 1.0]).half())  # 70000 overflows fp16 to inf
    assert writer.rejected_nonfinite == 1
    writer.flush()
    assert store.commit(0).keys == 1


def test_scores_are_copied_at_record(local_backend: Backend) -> None:
    store = local_backend.open()
    writer = store.writer(0)
    keys = np.array([hash_key("a"), hash_key("b")], np.uint64)
    scores = np.array([1.0, 2.0], np.float32)
    writer.record(keys, scores)
    scores[:] = 99.0  # the trainer reuses its buffers
    keys[:] = 0
    writer.flush()
    store.commit(0)
    assert store.snapshot().lookup(["a", "b"]).tolist() == [1.0, 2.0]


def test_bad_scores(local_backend: Backend) -> None:
    writer = local_backend.open().writer(0)
    with pytest.raises(ValueError, match="2 keys but 3 scores"):
        writer.record(["a", "b"], [1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="numbers"):
        writer.record(["a"], ["high"])
    with pytest.raises(TypeError, match="float"):
        writer.record([1.5], [1.0])  # a float is no key
    assert writer.pending == 0  # a refused batch leaves nothing behind
    assert writer.flush() is None


def test_a_key_twice_within_one_flush(backend: Backend) -> None:
    store = backend.open()
    writer = store.writer(0)
    writer.record(["k", "other", "k"], [1.0, 5.0, 2.0])
    writer.record(["k"], [3.0])
    relpath = writer.flush()
    meta, batch = delta_meta(backend, relpath)
    assert meta["duplicates"] == 2
    assert batch.num_rows == 2  # one row per key in a delta
    manifest = store.commit(0)
    assert manifest.duplicates == 2
    assert manifest.updated == 2
    assert store.snapshot().lookup(["k", "other"]).tolist() == [3.0, 5.0]


def test_a_key_across_flushes_and_ranks_last_write_wins(backend: Backend) -> None:
    """The merge order is counted, never clocked: (incarnation, sequence, rank). A rank's later
    flush wins over its earlier one; across ranks the sequence number decides, then the rank
    (a key two ranks update in one epoch is a collision, counted either way)."""
    store = backend.open()
    w0, w1, w2 = (store.writer(0, rank=r) for r in range(3))
    w2.record(["x", "y"], [1.0, 1.0])
    w1.record(["x"], [2.0])
    w0.record(["x", "y"], [3.0, 3.0])
    w0.flush()          # s0 of rank 0
    w1.flush()          # s0 of rank 1
    w0.record(["y"], [4.0])
    w0.flush()          # s1 of rank 0: after every s0
    w2.flush()          # s0 of rank 2: after rank 0's and 1's s0, before any s1
    manifest = store.commit(0)
    # x written 3 times, y 3 times: 4 updates hit a key already updated this epoch
    assert manifest.duplicates == 4
    assert manifest.updated == 2 and manifest.keys == 2
    assert store.snapshot().lookup(["x", "y"]).tolist() == [1.0, 4.0]


def test_a_later_writer_of_a_rank_wins_whatever_the_clock_says(backend: Backend, monkeypatch) -> None:
    """Two writer objects of one rank, one after the other (a restart without a lease): the
    second continues the first's sequence, so its scores win even when the clock stepped back
    by minutes between them (delta names held the flush time before)."""
    import time

    store = backend.open()
    real_ns = time.time_ns
    with store.writer(0, rank=0) as first:
        first.record(["x"], [1.0])
    monkeypatch.setattr(time, "time_ns", lambda: real_ns() - 10 * 60 * 10**9)  # 10 min back
    with store.writer(0, rank=0) as second:
        second.record(["x"], [2.0])
    assert [n.rsplit("/", 1)[1][:24] for n in store.pending_deltas(0)] == \
        ["i00000000-r00000-s000000", "i00000000-r00000-s000001"]
    assert store.commit(0).duplicates == 1
    assert store.snapshot().lookup(["x"]).tolist() == [2.0]


def test_flush_rows_bounds_the_buffer_and_the_context_manager_flushes(local_backend: Backend) -> None:
    store = local_backend.open()
    with store.writer(0, flush_rows=10) as writer:
        for start in range(0, 25, 5):
            writer.record([f"k{i}" for i in range(start, start + 5)], np.arange(start, start + 5))
            assert writer.pending < 10
        assert len(writer.files_written) == 2
    assert len(writer.files_written) == 3 and writer.rows_written == 25
    assert store.pending_deltas(0) == sorted(writer.files_written)
    store.commit(0)
    assert store.snapshot().lookup([f"k{i}" for i in range(25)]).tolist() == list(range(25))


def test_an_exception_inside_the_writer_block_flushes_nothing(local_backend: Backend) -> None:
    store = local_backend.open()
    with pytest.raises(RuntimeError), store.writer(0) as writer:
        writer.record(["a"], [1.0])
        raise RuntimeError("trainer crashed")
    assert store.pending_deltas(0) == []


@pytest.mark.parametrize("shape", ["uniform", "duplicates", "narrow", "constant", "extremes", "small"])
def test_stable_sort_is_argsort_stable(shape: str) -> None:
    """The writer's and the merge's sort is exactly a stable argsort (ties keep write order:
    that is what makes the last write win)."""
    from infobatch_stream.storage.writer import last_write_wins, stable_sort

    rng = np.random.default_rng(len(shape))
    n = 1000 if shape == "small" else 150_000
    hashes = {
        "uniform": lambda: rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True),
        "duplicates": lambda: rng.integers(0, 2**64 - 1, n // 50, dtype=np.uint64)[
            rng.integers(0, n // 50, n)],
        "narrow": lambda: np.uint64(2**40) + rng.integers(0, 3 * n, n, dtype=np.uint64),
        "constant": lambda: np.full(n, 12345, np.uint64),
        "extremes": lambda: rng.choice(np.array([0, 1, 2**64 - 2, 2**64 - 1], np.uint64), n),
        "small": lambda: rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True),
    }[shape]()
    order, sorted_hashes = stable_sort(hashes)
    expected = np.argsort(hashes, kind="stable")
    assert np.array_equal(order, expected)
    assert np.array_equal(sorted_hashes, hashes[expected])
    scores = np.arange(n, dtype=np.float32)  # the write position of each update
    kept_hashes, kept_scores, duplicates = last_write_wins(hashes, scores)
    unique, last_index = np.unique(hashes[::-1], return_index=True)
    assert np.array_equal(kept_hashes, unique)
    assert np.array_equal(kept_scores, (n - 1 - last_index).astype(np.float32))
    assert duplicates == n - len(unique)

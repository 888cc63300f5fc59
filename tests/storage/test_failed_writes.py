"""A failed write never drops recorded scores: rows change hands only once their delta is
written. An S3 outage past the retry budget, a full disk, a failed background flush: each
leaves the rows buffered, in order, and re-running the step commits every score. A full disk
or cache is a StorageFullError that names the store, the file and what to do."""

from __future__ import annotations

import errno
import os
import threading
from concurrent.futures import wait

import numpy as np
import pytest

from infobatch_stream.storage import (
    RetryPolicy,
    ScoreStore,
    StorageFullError,
    StoreUnavailableError,
    fsio,
    layout,
    merge,
)

from .conftest import Backend
from .helpers import Reference, assert_snapshot_matches, key_strings, ref_hashes

TINY = RetryPolicy(attempts=2, first_delay=0.05, max_delay=0.05)
NO_BOTOCORE_RETRIES = {"config_kwargs": {"retries": {"max_attempts": 1}}}


def _updates(ref: Reference, rng, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    idx = rng.choice(len(ref.hashes), n, replace=False)
    return idx, rng.gamma(2.0, 1.0, n).astype(np.float32)


def _full_disk(monkeypatch, times: int, where: str = "/deltas/") -> list[str]:
    """``fsio.write_bytes`` fails with ENOSPC for the next ``times`` writes under ``where``."""
    real = fsio.write_bytes
    failed: list[str] = []

    def write(fs, path, data, **kwargs):
        if where in path and len(failed) < times:
            failed.append(path)
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(fs, path, data, **kwargs)

    monkeypatch.setattr(fsio, "write_bytes", write)
    return failed


def test_an_s3_outage_past_the_budget_keeps_every_recorded_score(restartable_s3, cache_dir) -> None:
    """The flush fails past the retry budget; more is recorded meanwhile (newer scores for
    some of the same keys); once the server is back, re-running the flush and the commit
    persists every score, the newer ones winning. (The writer used to empty its buffer
    before writing: the epoch committed with those scores silently missing.)"""
    server = restartable_s3
    bucket = f"outage-{os.urandom(6).hex()}"
    server.filesystem().mkdir(bucket)
    url = f"s3://{bucket}/scores"
    options = dict(server.storage_options, **NO_BOTOCORE_RETRIES)
    store = ScoreStore(url, storage_options=options, cache_dir=cache_dir, retries=TINY)
    ref = Reference(ref_hashes(key_strings(0, 1000)))
    rng = np.random.default_rng(5)
    writer = store.writer(0)
    first = _updates(ref, rng)
    writer.record(ref.hashes[first[0]], first[1])
    server.stop()
    with pytest.raises(StoreUnavailableError, match=url):
        writer.flush()
    assert writer.pending == len(first[0])
    second = (np.concatenate([first[0][:50], _updates(ref, rng, 100)[0]]),
              rng.gamma(2.0, 1.0, 150).astype(np.float32))
    writer.record(ref.hashes[second[0]], second[1])
    with pytest.raises(StoreUnavailableError):
        store.commit(0)  # the re-run step fails too while the server is down
    server.start()
    writer.flush()  # the re-run: everything recorded goes out, in order
    assert writer.pending == 0
    store.commit(0)
    ref.write(0, *first)
    ref.write(0, *second)
    fresh = ScoreStore(url, storage_options=options, cache_dir=cache_dir + "-reader")
    assert_snapshot_matches(fresh.snapshot(0), ref)


def test_a_full_disk_keeps_every_row_and_names_the_store(backend: Backend, monkeypatch) -> None:
    store = backend.open(retries=RetryPolicy(attempts=5, first_delay=0.01))
    ref = Reference(ref_hashes(key_strings(0, 500)))
    rng = np.random.default_rng(6)
    writer = store.writer(0, flush_rows=300)
    failed = _full_disk(monkeypatch, times=3)
    first = _updates(ref, rng)
    writer.record(ref.hashes[first[0]], first[1])
    with pytest.raises(StorageFullError) as info:
        writer.flush()
    err = info.value
    assert err.url == backend.url and err.path.endswith(".arrow") and "/deltas/" in err.path
    assert backend.url in str(err) and "free space" in str(err) and "re-run" in str(err)
    assert len(failed) == 1  # a full disk is not retried as if it were transient
    second = _updates(ref, rng)
    with pytest.raises(StorageFullError):  # reaching flush_rows writes: still full
        writer.record(ref.hashes[second[0]], second[1])
    assert writer.pending == 400  # both batches still buffered
    with pytest.raises(StorageFullError):
        writer.flush()
    assert store.pending_deltas(0) == []
    relpath = writer.flush()  # space was freed: one delta with every row
    assert relpath is not None and writer.pending == 0 and len(failed) == 3
    store.commit(0)
    ref.write(0, *first)
    ref.write(0, *second)
    assert_snapshot_matches(backend.open().snapshot(0), ref)


@pytest.mark.parametrize("failure", ["disk-full", "outage"])
def test_a_failed_background_flush_surfaces_and_its_rows_go_out_with_the_retry(
        local_backend: Backend, monkeypatch, failure: str) -> None:
    store = local_backend.open(retries=TINY)
    ref = Reference(ref_hashes(key_strings(0, 2000)))
    rng = np.random.default_rng(7)
    writer = store.writer(0, flush_rows=100, background=True)
    real = fsio.write_bytes
    calls = []
    failing = threading.Event()
    failing.set()

    def write(fs, path, data, **kwargs):
        if "/deltas/" in path and failing.is_set():
            calls.append(path)
            if failure == "disk-full":
                raise OSError(errno.ENOSPC, "No space left on device", path)
            raise ConnectionRefusedError("connection refused")
        return real(fs, path, data, **kwargs)

    monkeypatch.setattr(fsio, "write_bytes", write)
    batches = [_updates(ref, rng, 120) for _ in range(3)]
    writer.record(ref.hashes[batches[0][0]], batches[0][1])  # reaches flush_rows: background write
    wait(writer._in_flight)  # the background write has failed (the test waits for it)
    expected = StorageFullError if failure == "disk-full" else StoreUnavailableError
    with pytest.raises(expected):  # the next call that touches the writer raises it
        writer.record(ref.hashes[batches[1][0]], batches[1][1])
    assert writer.pending == 240  # the failed write's rows and this call's, in order
    failing.clear()
    writer.record(ref.hashes[batches[2][0]], batches[2][1])  # the retry: everything goes out
    writer.flush()
    assert writer.pending == 0 and store.pending_deltas(0)
    writer.close()
    store.commit(0)
    for batch in batches:
        ref.write(0, *batch)
    assert_snapshot_matches(local_backend.open().snapshot(0), ref)


@pytest.mark.parametrize("backend", ["s3"], indirect=True)  # a local store is mapped in place
def test_a_full_cache_disk_names_the_cache_and_how_to_move_it(backend: Backend, monkeypatch) -> None:
    store = backend.open()
    with store.writer(0) as writer:
        writer.record(["a"], [1.0])
    store.commit(0)
    reader = backend.open(retries=RetryPolicy(attempts=4, first_delay=0.01))
    real = fsio.get_file
    calls = []

    def full(fs, path, local, **kwargs):
        calls.append(local)
        raise OSError(errno.ENOSPC, "No space left on device", local)

    monkeypatch.setattr(fsio, "get_file", full)
    with pytest.raises(StorageFullError) as info:
        reader.snapshot()
    message = str(info.value)
    assert backend.url in message and store.manifest(0).snapshot in message
    assert reader.cache_dir in message and "INFOBATCH_STREAM_CACHE" in message
    assert len(calls) == 1
    monkeypatch.setattr(fsio, "get_file", real)
    assert reader.snapshot().lookup(["a"]).tolist() == [1.0]


def test_a_full_disk_under_the_commits_work_changes_nothing(backend: Backend, monkeypatch) -> None:
    store = backend.open()
    with store.writer(0) as writer:
        writer.record(["a", "b"], [1.0, 2.0])
    real = merge.write_table_file

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(merge, "write_table_file", full)
    before = backend.files()
    with pytest.raises(StorageFullError) as info:
        store.commit(0)
    message = str(info.value)
    assert backend.url in message and "snapshot.arrow" in message
    assert ("INFOBATCH_STREAM_CACHE" in message) == (backend.name == "s3")
    assert backend.visible() == {p for p in before if not p.startswith(".tmp-")}
    assert store.epochs == []
    monkeypatch.setattr(merge, "write_table_file", real)
    assert store.commit(0).keys == 2


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_arrows_own_disk_full_error_is_recognised(tmp_path) -> None:
    """The commit writes its snapshot with pyarrow, whose error may carry no errno."""
    from infobatch_stream.storage.files import is_disk_full
    from infobatch_stream.storage.tables import SNAPSHOT_SCHEMA, write_table_file

    columns = [np.arange(1 << 16, dtype=np.uint64), np.ones(1 << 16, np.float32),
               np.zeros(1 << 16, np.uint32)]
    with pytest.raises(OSError) as info:
        write_table_file("/dev/full", SNAPSHOT_SCHEMA, columns, {"kind": "snapshot"})
    assert is_disk_full(info.value)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_the_rows_of_a_write_whose_reply_was_lost_are_sent_again_in_order(local_backend: Backend,
                                                                             monkeypatch) -> None:
    """The write went through but the caller saw an error (a reply lost past the budget; the
    store's retries rewrite the same name): the rows are sent again under a later sequence
    number, with what was recorded after them, which wins."""
    store = local_backend.open(retries=TINY)
    writer = store.writer(0)
    writer.record(["a"], [1.0])
    real = fsio.write_bytes

    def lost(fs, path, data, **kwargs):
        real(fs, path, data, **kwargs)
        raise ConnectionResetError("reply lost")

    monkeypatch.setattr(fsio, "write_bytes", lost)
    with pytest.raises(StoreUnavailableError):
        writer.flush()
    monkeypatch.setattr(fsio, "write_bytes", real)
    writer.record(["a"], [2.0])
    writer.flush()
    names = store.pending_deltas(0)
    assert [layout.parse_delta_name(n).seq for n in names] == [0, 1]
    assert store.commit(0).duplicates >= 1
    assert store.snapshot().lookup(["a"]).tolist() == [2.0]


def test_wait_raises_a_background_failure_once(local_backend: Backend, monkeypatch) -> None:
    """``wait()`` raises it; the rows stay; after the retry, ``wait()`` and ``close()`` are quiet."""
    store = local_backend.open(retries=TINY)
    writer = store.writer(0, flush_rows=1, background=True)
    failed = _full_disk(monkeypatch, times=1)
    writer.record(["a"], [1.0])
    with pytest.raises(StorageFullError):
        writer.wait()
    assert failed and writer.pending == 1
    writer.wait()
    writer.flush()
    writer.close()
    assert store.commit(0).keys == 1


def test_a_write_that_fills_the_disk_leaves_no_partial_temporary(local_backend: Backend,
                                                                  monkeypatch) -> None:
    """The disk fills while the temporary is being written (here: at its fsync): the partial
    temporary is removed at once, not left for a later sweep on a disk that is full."""
    import types

    store = local_backend.open()
    writer = store.writer(0)
    writer.record(["a"], [1.0])
    proxy = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})

    def fsync_on_a_full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    proxy.fsync = fsync_on_a_full_disk
    monkeypatch.setattr(fsio, "os", proxy)
    with pytest.raises(StorageFullError):
        writer.flush()
    monkeypatch.undo()
    assert [p for p in local_backend.files() if ".tmp-" in p] == []
    writer.flush()
    assert store.commit(0).keys == 1

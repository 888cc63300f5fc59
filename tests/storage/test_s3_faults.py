"""Storage that fails under the store: an S3 server stopped mid-epoch and started again, one
that stays down, one that accepts connections and never answers, and replies lost after the
request went through.

What s3fs and botocore already do, and what the store adds (see ``storage/retry.py``):
botocore retries each request (connection refused: 5 attempts in its default 'legacy' mode,
about 8 s), s3fs retries interrupted reads; the store retries a whole step with exponential
backoff past that, within a budget, then raises ``StoreUnavailableError`` naming the URL.
Most tests here turn botocore's retries off (``max_attempts: 1``), so that the store's own
layer is what is measured and the tests stay fast; one keeps every default.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid

import numpy as np
import pytest

from infobatch_stream.storage import RetryPolicy, ScoreStore, StoreUnavailableError, fsio, layout

from .conftest import Backend
from .helpers import Reference, assert_snapshot_matches, key_strings, ref_hashes

QUICK = RetryPolicy(attempts=12, first_delay=0.1, max_delay=0.5)  # rides out ~2 s
NO_BOTOCORE_RETRIES = {"config_kwargs": {"retries": {"max_attempts": 1}}}


def open_store(server, url: str, cache_dir: str, *, botocore_retries: bool = False,
               **kwargs) -> ScoreStore:
    options = dict(server.storage_options, **({} if botocore_retries else NO_BOTOCORE_RETRIES))
    return ScoreStore(url, storage_options=options, cache_dir=cache_dir, **kwargs)


def new_url(server) -> str:
    bucket = f"faults-{uuid.uuid4().hex[:12]}"
    server.filesystem().mkdir(bucket)
    return f"s3://{bucket}/scores"


def record(store: ScoreStore, ref: Reference, epoch: int, rng, rank: int = 0) -> None:
    idx = rng.choice(len(ref.hashes), 300, replace=False)
    scores = rng.random(300).astype(np.float32)
    with store.writer(epoch, rank=rank) as writer:
        writer.record(ref.hashes[idx], scores)
    ref.write(epoch, idx, scores)


def visible_files(server, url: str) -> set[str]:
    fs = server.filesystem()
    root = url.removeprefix("s3://")
    return {p[len(root) + 1:] for p in fs.find(root)}


def layout_of(store: ScoreStore) -> set[str]:
    manifests = [store.manifest(e) for e in store.epochs]
    return ({layout.MARKER} | {layout.manifest_name(m.epoch) for m in manifests}
            | {m.snapshot for m in manifests})


def test_a_server_restart_mid_epoch_and_mid_commit_is_ridden_out(restartable_s3, cache_dir,
                                                                 monkeypatch, caplog) -> None:
    server = restartable_s3
    url = new_url(server)
    store = open_store(server, url, cache_dir, retries=QUICK)
    ref = Reference(ref_hashes(key_strings(0, 1000)))
    rng = np.random.default_rng(1)
    record(store, ref, 0, rng)
    store.commit(0)

    caplog.set_level(logging.WARNING, logger="infobatch_stream.storage.retry")
    writer = store.writer(1, rank=0)
    idx = rng.choice(1000, 300, replace=False)
    scores = rng.random(300).astype(np.float32)
    writer.record(ref.hashes[idx], scores)
    restart = server.down_for(1.0)  # the middle of the epoch: a flush while the server is down
    writer.flush()
    restart.join()
    during_flush = [r.getMessage() for r in caplog.records]
    assert any("failed (EndpointConnectionError" in m for m in during_flush), during_flush
    caplog.clear()
    ref.write(1, idx, scores)
    record(store, ref, 1, rng, rank=1)

    real_put = fsio.put_file
    outage = []

    def put_during_an_outage(*args, **kwargs):  # the commit's snapshot upload
        # Once: the store's retries call this same function again, and a second outage
        # would start a second server racing the first for the port.
        if not outage:
            outage.append(server.down_for(1.0))
        return real_put(*args, **kwargs)

    monkeypatch.setattr(fsio, "put_file", put_during_an_outage)
    manifest = store.commit(1)
    outage[0].join()
    retried = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert any("upload" in m and "/snapshots/" in m for m in retried), retried

    fresh = open_store(server, url, cache_dir + "-reader")
    assert fresh.epochs == [0, 1] and manifest == fresh.manifest(1)
    assert_snapshot_matches(fresh.snapshot(1), ref)
    assert visible_files(server, url) == layout_of(fresh)


def test_a_short_outage_with_every_default(restartable_s3, cache_dir) -> None:
    """No retry settings anywhere: botocore's and the store's defaults ride out a restart."""
    server = restartable_s3
    url = new_url(server)
    store = open_store(server, url, cache_dir, botocore_retries=True)
    ref = Reference(ref_hashes(key_strings(0, 1000)))
    rng = np.random.default_rng(2)
    record(store, ref, 0, rng)
    restart = server.down_for(1.5)
    store.commit(0)
    restart.join()
    assert_snapshot_matches(open_store(server, url, cache_dir + "-r").snapshot(0), ref)


def test_past_the_budget_a_clear_error_and_no_partial_commit(restartable_s3, cache_dir,
                                                             monkeypatch) -> None:
    server = restartable_s3
    url = new_url(server)
    budget = RetryPolicy(attempts=3, first_delay=0.05, max_delay=0.1)
    store = open_store(server, url, cache_dir, retries=budget)
    ref = Reference(ref_hashes(key_strings(0, 500)))
    rng = np.random.default_rng(3)
    record(store, ref, 0, rng)
    store.commit(0)
    committed = ref.copy()
    record(store, ref, 1, rng)
    pending = set(store.pending_deltas(1))

    real_put = fsio.put_file

    def upload_then_lose_the_server(*args, **kwargs):
        monkeypatch.setattr(fsio, "put_file", real_put)
        real_put(*args, **kwargs)  # the snapshot is up; the manifest will not be
        server.stop()

    monkeypatch.setattr(fsio, "put_file", upload_then_lose_the_server)
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as info:
        store.commit(1)
    assert time.monotonic() - started < 30  # bounded: 3 attempts, not a hang
    err = info.value
    assert err.url == url and err.attempts == 3
    assert url in str(err) and layout.manifest_name(1) in str(err) and "3 times" in str(err)
    assert type(err.__cause__).__name__ == "EndpointConnectionError"  # kept as the cause
    # A reader during the outage gets the same kind of error, naming the store.
    with pytest.raises(StoreUnavailableError, match=url):
        open_store(server, url, cache_dir + "-reader", retries=budget).snapshot()

    server.start()
    fresh = open_store(server, url, cache_dir + "-after")
    assert fresh.epochs == [0]  # never a partial commit: epoch 1 is absent, its deltas intact
    assert set(fresh.pending_deltas(1)) == pending
    assert_snapshot_matches(fresh.snapshot(0), committed)
    fresh.commit(1)  # re-running the step completes it; the orphaned snapshot is retired
    assert_snapshot_matches(fresh.snapshot(1), ref)
    assert visible_files(server, url) == layout_of(fresh)


def test_a_server_that_never_answers_fails_in_bounded_time(cache_dir) -> None:
    """Connections are accepted and never answered (a stuck proxy): every layer times out
    within its budget, and the store raises StoreUnavailableError; it never hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        port = listener.getsockname()[1]
        options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s",
                   "config_kwargs": {"read_timeout": 0.3, "connect_timeout": 0.3,
                                     "retries": {"max_attempts": 1}}}
        store = ScoreStore("s3://stuck/scores", storage_options=options, cache_dir=cache_dir,
                           retries=RetryPolicy(attempts=2, first_delay=0.05))
        store.fs.retries = 1  # s3fs's own retries of a timed-out read (5 by default)
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="s3://stuck/scores") as info:
            store.latest_epoch
        assert time.monotonic() - started < 20
        assert info.value.attempts == 2
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()


def test_credentials_refused_is_a_store_error_at_once(restartable_s3, cache_dir) -> None:
    """A failure no retry can fix (no credentials) is not retried, and still names the URL."""
    options = {"endpoint_url": restartable_s3.endpoint_url, "anon": True}
    store = ScoreStore(f"s3://{uuid.uuid4().hex[:12]}/scores", storage_options=options,
                       cache_dir=cache_dir, retries=RetryPolicy(attempts=5, first_delay=5))
    started = time.monotonic()
    try:
        store.latest_epoch
    except StoreUnavailableError as err:  # never a raw botocore exception
        assert err.attempts == 1 and store.url in str(err)
    except (PermissionError, FileNotFoundError):
        pass  # moto answered 403/404: an OSError the caller can act on
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("what", ["manifest", "snapshot"])
def test_a_lost_reply_to_an_exclusive_create_is_not_a_lost_commit(backend: Backend, monkeypatch,
                                                                    what: str) -> None:
    """The request went through but its reply was lost; the retry's exclusive create then
    finds the file there. The commit must recognise its own file (an earlier version took
    its own manifest for a rival's and deleted the snapshot that manifest names)."""
    store = backend.open(retries=RetryPolicy(attempts=3, first_delay=0.01))
    with store.writer(0) as writer:
        writer.record(["a", "b"], [1.0, 2.0])
    name = "write_bytes" if what == "manifest" else "put_file"
    real = getattr(fsio, name)
    lost = []

    def goes_through_then_the_reply_is_lost(fs, *args, **kwargs):
        real(fs, *args, **kwargs)
        target = args[0] if name == "write_bytes" else args[1]
        if not lost and f"/{what}s/" in target:
            lost.append(target)
            raise ConnectionResetError("connection reset by peer (reply lost)")

    monkeypatch.setattr(fsio, name, goes_through_then_the_reply_is_lost)
    manifest = store.commit(0)
    assert lost
    fresh = backend.open()
    assert fresh.manifest(0) == manifest
    assert fresh.snapshot(0).lookup(["a", "b"]).tolist() == [1.0, 2.0]
    assert backend.visible() == layout_of(fresh)


def test_retry_policy_arguments() -> None:
    assert RetryPolicy.of(None) == RetryPolicy()
    assert RetryPolicy.of(4) == RetryPolicy(attempts=4)
    assert RetryPolicy(attempts=4, first_delay=1, max_delay=3).nominal_delays() == [1, 2, 3]
    for bad in (dict(attempts=0), dict(attempts=True), dict(first_delay=-1),
                dict(max_delay=float("nan")), dict(max_delay=1e9), dict(deadline=-1)):
        with pytest.raises(ValueError, match="retries"):
            RetryPolicy(**bad)
    with pytest.raises(TypeError, match="retries"):
        RetryPolicy.of("3")
    with pytest.raises(TypeError, match="retries"):
        ScoreStore("/tmp/never-created", retries=2.5)

"""The per-machine cache of remote snapshots: one download per machine, never a torn file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from infobatch_stream.storage import ScoreSnapshot, cache, fsio

from .conftest import Backend
from .helpers import REPO, child_env

CHILD = REPO / "tests" / "storage" / "_fetch_child.py"
s3_only = pytest.mark.parametrize("backend", ["s3"], indirect=True)


@s3_only
def test_two_processes_fetching_one_snapshot_into_one_cache(backend: Backend, tmp_path) -> None:
    rng = np.random.default_rng(4)
    hashes = np.unique(rng.integers(0, 2**64 - 1, 200_000, dtype=np.uint64, endpoint=True))
    scores = rng.random(len(hashes)).astype(np.float32)
    store = backend.open()
    with store.writer(0) as writer:
        writer.record(hashes, scores)
    manifest = store.commit(0)
    expected = tmp_path / "expected.npz"
    np.savez(expected, hashes=hashes, scores=scores)

    shared_cache = backend.new_cache_dir()  # not the committer's: both must fetch
    sync = tmp_path / "sync"
    sync.mkdir()
    env = child_env(backend.env)
    procs, outs = [], {}
    for role in ("first", "second"):
        outs[role] = tmp_path / f"{role}.json"
        args = tmp_path / f"{role}-args.json"
        args.write_text(json.dumps({
            "url": backend.url, "storage_options": backend.storage_options,
            "cache_dir": shared_cache, "role": role, "sync_dir": str(sync),
            "expected": str(expected), "out": str(outs[role])}))
        procs.append(subprocess.Popen([sys.executable, str(CHILD), str(args)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for proc in procs:
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output
    first, second = (json.loads(outs[r].read_text()) for r in ("first", "second"))

    assert first["exact"] and second["exact"]
    assert first["downloads"] == 1 and second["downloads"] == 0  # one download for the machine
    name = manifest.snapshot.rsplit("/", 1)[-1]
    # "second" asked while the download was complete but not yet in place: it waited for it
    assert name not in second["seen_before"]
    assert any(n.startswith(fsio.TMP_PREFIX) for n in second["seen_before"])
    assert first["path"] == second["path"] and first["inode"] == second["inode"]

    directory = cache.store_cache_dir(shared_cache, store.fs, store.root)
    assert sorted(os.listdir(directory)) == [name, f"{name}.lock"]  # one file, no temporary left
    assert os.path.getsize(first["path"]) == manifest.snapshot_bytes
    assert ScoreSnapshot.open(first["path"], 0).digest == manifest.snapshot_xxh3  # not torn


@s3_only
def test_a_crashed_download_is_ignored(backend: Backend) -> None:
    store = backend.open()
    with store.writer(0) as writer:
        writer.record(["a", "b"], [1.0, 2.0])
    manifest = store.commit(0)
    cache_dir = backend.new_cache_dir()
    reader = backend.open(cache_dir=cache_dir)
    directory = cache.store_cache_dir(cache_dir, reader.fs, reader.root)
    os.makedirs(directory)
    name = manifest.snapshot.rsplit("/", 1)[-1]
    torn = os.path.join(directory, f"{fsio.TMP_PREFIX}deadbeef-{name}")
    with open(torn, "wb") as out:
        out.write(b"half a download")
    assert reader.snapshot().lookup(["a", "b"]).tolist() == [1.0, 2.0]
    assert os.path.getsize(os.path.join(directory, name)) == manifest.snapshot_bytes


@s3_only
def test_retention_evicts_old_snapshots_from_the_cache(backend: Backend) -> None:
    cache_dir = backend.new_cache_dir()
    store = backend.open(cache_dir=cache_dir, keep_snapshots=1)
    names = []
    for epoch in range(3):
        with store.writer(epoch) as writer:
            writer.record(["a"], [float(epoch)])
        names.append(store.commit(epoch).snapshot.rsplit("/", 1)[-1])
        assert store.snapshot().lookup(["a"]).tolist() == [float(epoch)]
    directory = cache.store_cache_dir(cache_dir, store.fs, store.root)
    cached = {n for n in os.listdir(directory) if not n.startswith(fsio.TMP_PREFIX)}
    assert names[-1] in cached and not {names[0], names[1]} & cached


def test_the_cache_directory(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(cache.ENV_CACHE_DIR, str(tmp_path / "c"))
    assert cache.default_cache_dir() == str(tmp_path / "c")
    monkeypatch.delenv(cache.ENV_CACHE_DIR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.default_cache_dir() == str(tmp_path / "xdg" / "infobatch-stream")
    import fsspec

    fs = fsspec.filesystem("memory")
    one = cache.store_cache_dir("/c", fs, "bucket/a")
    assert one != cache.store_cache_dir("/c", fs, "bucket/b")  # one directory per store
    assert one == cache.store_cache_dir("/c", fs, "bucket/a")


@s3_only
@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_a_damaged_cached_copy_is_downloaded_again(backend: Backend, caplog, damage: str) -> None:
    """Damage in the cache (a disk error, a stray write) is not damage of the store: the copy
    is downloaded once more, and only a second failure is reported, naming the remote file."""
    store = backend.open()
    with store.writer(0) as writer:
        writer.record(["a", "b"], [1.0, 2.0])
    manifest = store.commit(0)
    cache_dir = backend.new_cache_dir()
    assert backend.open(cache_dir=cache_dir).snapshot().lookup(["a"]).tolist() == [1.0]
    directory = cache.store_cache_dir(cache_dir, store.fs, store.root)
    cached = os.path.join(directory, manifest.snapshot.rsplit("/", 1)[-1])
    with open(cached, "rb") as f:
        raw = bytearray(f.read())
    if damage == "flipped":
        scores = backend.open(cache_dir=cache_dir).snapshot().scores.tobytes()
        at = bytes(raw).find(scores)
        assert at > 0
        raw[at + 2] ^= 0x10
    else:
        raw = raw[:-64]
    with open(cached, "wb") as out:
        out.write(raw)
    caplog.set_level("WARNING")
    snap = backend.open(cache_dir=cache_dir).snapshot()
    assert snap.lookup(["a", "b"]).tolist() == [1.0, 2.0]
    assert "downloading it again" in caplog.text
    assert os.path.getsize(cached) == manifest.snapshot_bytes


@s3_only
def test_a_damaged_remote_file_is_reported_after_one_more_download(backend: Backend) -> None:
    from infobatch_stream.storage import CorruptStoreError

    store = backend.open()
    for epoch in (0, 1):
        with store.writer(epoch) as writer:
            writer.record(["a", "b"], [1.0, 2.0 + epoch])
        manifest = store.commit(epoch)
    raw = bytearray(backend.read(manifest.snapshot))
    raw[-200] ^= 0xFF  # the footer: the copy no longer opens
    backend.write(manifest.snapshot, bytes(raw))
    downloads = []
    real = fsio.get_file

    def counting(*args, **kwargs):
        downloads.append(args[1])
        return real(*args, **kwargs)

    fsio.get_file = counting
    try:
        with pytest.raises(CorruptStoreError) as info:
            backend.open().snapshot(1)
    finally:
        fsio.get_file = real
    assert info.value.path == backend.path(manifest.snapshot) and info.value.last_good_epoch == 0
    assert downloads.count(backend.path(manifest.snapshot)) == 2  # once more, then reported


@s3_only
def test_a_reading_machines_cache_stays_bounded(backend: Backend) -> None:
    """Retention evicts the committing machine's cache; a machine that only reads evicts its
    own after each download, keeping ``keep_snapshots`` epochs (it used to keep them all)."""
    store = backend.open(keep_snapshots=2)
    reader_cache = backend.new_cache_dir()
    reader = backend.open(cache_dir=reader_cache, keep_snapshots=2)
    for epoch in range(6):
        with store.writer(epoch) as writer:
            writer.record(["a", "b"], [float(epoch), 1.0])
        store.commit(epoch)
        assert reader.snapshot().lookup(["a"]).tolist() == [float(epoch)]
    directory = cache.store_cache_dir(reader_cache, reader.fs, reader.root)
    snapshots = sorted(n for n in os.listdir(directory) if n.endswith(".arrow"))
    assert [cache.snapshot_epoch(n) for n in snapshots] == [4, 5]


@s3_only
def test_stale_temporaries_in_the_cache_are_removed_live_ones_kept(backend: Backend) -> None:
    """A crashed download's temporary goes once no process downloads that file; one whose
    download is live (its lock held) stays. A dead commit's work directory goes too."""
    import fcntl
    import time

    store = backend.open()
    with store.writer(0) as writer:
        writer.record(["a"], [1.0])
    manifest = store.commit(0)
    cache_dir = backend.new_cache_dir()
    directory = cache.store_cache_dir(cache_dir, store.fs, store.root)
    os.makedirs(directory)
    dead = os.path.join(directory, f"{fsio.TMP_PREFIX}{'a' * 32}-epoch-00000000-{'1' * 32}.arrow")
    live_name = f"epoch-00000000-{'2' * 32}.arrow"
    live = os.path.join(directory, f"{fsio.TMP_PREFIX}{'b' * 32}-{live_name}")
    work = os.path.join(directory, f"{fsio.COMMIT_DIR_PREFIX}dead")
    for path in (dead, live):
        open(path, "wb").close()
    os.makedirs(work)
    open(os.path.join(work, "snapshot.arrow"), "wb").close()
    old = time.time() - 60
    os.utime(work, (old, old))
    with open(os.path.join(directory, live_name + ".lock"), "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # a download of live_name in progress
        reader = backend.open(cache_dir=cache_dir)
        assert reader.snapshot().lookup(["a"]).tolist() == [1.0]  # downloads: evicts
        with store.writer(1) as writer:
            writer.record(["a"], [2.0])
        backend.open(cache_dir=cache_dir).commit(1)  # retention on this machine: sweeps
        left = set(os.listdir(directory))
    assert os.path.basename(live) in left
    assert os.path.basename(dead) not in left and os.path.basename(work) not in left
    assert live_name + ".lock" in left  # the live download's lock was not pulled away
    del manifest


@s3_only
def test_a_cached_copy_evicted_while_being_opened_is_fetched_again(backend: Backend,
                                                                   monkeypatch) -> None:
    """Another process of the machine may evict a cached snapshot right after this one found
    it (a reader of a newer epoch does): that is not a missing remote file."""
    store = backend.open()
    with store.writer(0) as writer:
        writer.record(["a"], [1.0])
    store.commit(0)
    real = cache.fetch
    evicted = []

    def fetch_then_evicted(*args, **kwargs):
        path, downloaded = real(*args, **kwargs)
        if not evicted:
            evicted.append(path)
            os.unlink(path)  # gone before this process opens it
        return path, downloaded

    monkeypatch.setattr(cache, "fetch", fetch_then_evicted)
    assert backend.open().snapshot().lookup(["a"]).tolist() == [1.0]
    assert evicted

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

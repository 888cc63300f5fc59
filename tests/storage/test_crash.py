"""Store operations SIGKILLed at every step that changes what is persisted.

For k = 0, 1, 2, ... a child process runs one operation and is killed just before its k-th
write, rename, link or delete, until a run finishes unkilled:

- a commit of epoch 2 of a store holding epochs 0 and 1, three ranks' deltas of epoch 2, a
  late delta of committed epoch 1 and (locally) a temporary of an earlier kill, so that the
  commit's retention deletes are killed too;
- a flush of one rank's delta;
- a download of a remote snapshot into the per-machine cache.

After each kill, read in this process: every epoch the store lists is intact (exact lookups),
the interrupted step is fully done or not at all, and running it again completes it, leaving
a store that holds exactly what its manifests name (no temporary, no merged delta).
A last test runs a reader process that loops over lookups while commits follow one another:
each lookup it makes sees one whole epoch, old or new, never a mix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from infobatch_stream.storage import cache, layout

from .conftest import Backend
from .helpers import REPO, Reference, assert_snapshot_matches, child_env, key_strings, ref_hashes

HELPER = REPO / "tests" / "storage" / "_crash_commit.py"
KEEP = 2  # committing epoch 2 also retires epoch 0: its manifest and snapshot are deleted


def build_template(backend: Backend) -> dict[int, Reference]:
    """Epochs 0 and 1 committed, epoch 2 flushed by three ranks (overlapping keys); a delta of
    epoch 1 flushed after its commit (never merged); locally, a temporary left by a kill."""
    store = backend.open(keep_snapshots=KEEP)
    ref = Reference(ref_hashes(key_strings(0, 400)))
    rng = np.random.default_rng(9)
    refs = {}
    for epoch in range(3):
        for rank in range(3):
            idx = rng.choice(400, 120, replace=False)
            scores = rng.random(120).astype(np.float32)
            with store.writer(epoch, rank=rank) as writer:
                writer.record(ref.hashes[idx], scores)
            ref.write(epoch, idx, scores)
        refs[epoch] = ref.copy()
        if epoch < 2:
            store.commit(epoch)
    with store.writer(1, rank=5) as late:  # after epoch 1's commit: retention must remove it
        late.record(["late"], [99.0])
    if backend.name == "local":  # a killed flush's temporary, older than any later commit
        backend.write(f"snapshots/.tmp-{'0' * 32}-epoch-00000001-{'0' * 32}.arrow", b"half")
    assert len(store.pending_deltas(2)) == 3 and len(store.pending_deltas(1)) == 1
    return refs


def copy_store(backend: Backend, name: str) -> Backend:
    target = backend.sibling(name)
    if backend.name == "local":
        import shutil

        shutil.copytree(backend.root, target.root)
    else:
        backend.fs.copy(backend.root, target.root, recursive=True)
        target.fs.invalidate_cache()
    return target


class CrashServer:
    def __init__(self, tmp_path, env: dict[str, str]):
        full_env = child_env(env)
        # open for the helper's whole life: read back when it dies or when the server is closed
        self.stderr = open(tmp_path / "crash-helper.stderr", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, str(HELPER)], cwd=REPO, env=full_env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True)

    def run(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.stderr.seek(0)
            raise AssertionError(f"crash helper died:\n{self.stderr.read()}")
        return json.loads(line)

    def close(self) -> str:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.stderr.seek(0)
        return self.stderr.read()


def temporaries_in(directory: str) -> list[str]:
    """Temporary names (``.tmp-*``) anywhere under a local directory."""
    found = []
    for parent, dirs, names in os.walk(directory):
        found += [os.path.join(parent, n) for n in dirs + names if n.startswith(".tmp-")]
    return found


def expected_layout(store) -> set[str]:
    manifests = [store.manifest(e) for e in store.epochs]
    return ({layout.MARKER} | {layout.manifest_name(m.epoch) for m in manifests}
            | {m.snapshot for m in manifests})


@pytest.mark.parametrize("backend", ["local", "s3"], indirect=True)
def test_commit_killed_at_every_step(backend: Backend, tmp_path) -> None:
    template = backend.sibling("template")
    refs = build_template(template)
    template_deltas = set(template.open().pending_deltas(2))
    server = CrashServer(tmp_path, backend.env)
    outcomes: dict[str, list[str]] = {"absent": [], "committed": []}
    try:
        for k in range(200):
            work = copy_store(template, f"attempt-{k}")
            cache_dir = work.new_cache_dir()
            reply = server.run(op="commit", url=work.url, storage_options=work.storage_options,
                                  cache_dir=cache_dir, epoch=2, keep_snapshots=KEEP, kill_at=k,
                                  log=str(tmp_path / f"steps-{k}.log"))
            assert reply["exit"] in (None, 0), f"the committing child failed: {reply}"
            where = f"killed before step {k}: {reply['steps'][-1] if reply['steps'] else '?'}"

            # What any reader now sees (with a cache of its own, kept for the second look).
            reader_cache = work.new_cache_dir()
            reader = work.open(cache_dir=reader_cache, keep_snapshots=KEEP)
            epochs = reader.epochs
            assert 1 in epochs and set(epochs) <= {0, 1, 2}, where
            verified = {}
            for epoch in epochs:  # a listed epoch is whole: its snapshot opens and is exact
                assert_snapshot_matches(reader.snapshot(epoch), refs[epoch])
                verified[epoch] = reader.manifest(epoch)
            if 2 in epochs:
                outcomes["committed"].append(where)
            else:
                outcomes["absent"].append(where)
                assert set(reader.pending_deltas(2)) == template_deltas, f"{where}: lost a delta"

            # Running the commit again (on the killed process's cache) completes it.
            manifest = work.open(cache_dir=cache_dir, keep_snapshots=KEEP).commit(2)
            assert manifest.keys == int(refs[2].known.sum())
            assert manifest.duplicates == refs[2].duplicates(2)
            after = work.open(cache_dir=reader_cache, keep_snapshots=KEEP)
            assert after.epochs == [1, 2], where
            for epoch in (1, 2):
                if after.manifest(epoch) != verified.get(epoch):  # else: the same, checked file
                    assert_snapshot_matches(after.snapshot(epoch), refs[epoch])
            # Nothing else is left: no merged or late delta, no temporary of the kill (the
            # commit's work directory, a hard link), none in the committing machine's cache.
            assert set(work.files()) == expected_layout(after), f"{where}: leftovers"
            assert after.leftover_deltas() == {}
            assert not temporaries_in(cache_dir), f"{where}: {temporaries_in(cache_dir)}"
            if not reply["killed"]:
                assert reply["steps"][-1] == "end"
                break
        else:
            pytest.fail("the commit never finished: more than 200 steps")
    finally:
        helper_stderr = server.close()
    assert outcomes["absent"] and outcomes["committed"], outcomes
    assert len(outcomes["absent"]) + len(outcomes["committed"]) == k + 1
    assert "child failed" not in helper_stderr, helper_stderr


def kill_at_every_step(server: CrashServer, tmp_path, name: str, prepare, check, **request):
    """Run ``request`` killed before step 0, 1, ... on a fresh copy made by ``prepare(k)``
    (-> (backend, cache_dir)); ``check(work, cache_dir, reply, where)`` after each run.
    Returns the number of runs (the last one finished)."""
    for k in range(200):
        work, cache_dir = prepare(k)
        reply = server.run(url=work.url, storage_options=work.storage_options,
                           cache_dir=cache_dir, kill_at=k, log=str(tmp_path / f"{name}-{k}.log"),
                           **request)
        assert reply["exit"] in (None, 0), f"the child failed: {reply}"
        where = f"{name} killed before step {k}: {reply['steps'][-1] if reply['steps'] else '?'}"
        check(work, cache_dir, reply, where)
        if not reply["killed"]:
            assert reply["steps"][-1] == "end"
            return k + 1
    pytest.fail(f"{name} never finished: more than 200 steps")


@pytest.mark.parametrize("backend", ["local", "s3"], indirect=True)
def test_flush_killed_at_every_step(backend: Backend, tmp_path) -> None:
    """A delta is in the store whole or not at all; flushing again and committing gives the
    snapshot of every update, and the commit leaves nothing of the kill behind."""
    template = backend.sibling("template")
    refs = build_template(template)
    before = set(template.open().pending_deltas(2))
    rng = np.random.default_rng(21)
    idx = rng.choice(400, 150, replace=False)
    scores = rng.random(150).astype(np.float32)
    updates = tmp_path / "updates.npz"
    np.savez(updates, hashes=refs[2].hashes[idx], scores=scores)
    want = refs[2].copy()
    want.write(2, idx, scores)
    server = CrashServer(tmp_path, backend.env)

    def prepare(k):
        work = copy_store(template, f"flush-{k}")
        return work, work.new_cache_dir()

    def check(work, cache_dir, reply, where):
        reader = work.open(keep_snapshots=KEEP)
        assert reader.epochs == [0, 1], where
        pending = set(reader.pending_deltas(2))
        new = pending - before
        assert before <= pending and len(new) <= 1, where
        if not reply["killed"]:
            assert new, where
        else:  # flush again (the restarted epoch re-records), then commit
            with reader.writer(2, rank=0) as writer:
                writer.record(refs[2].hashes[idx], scores)
        manifest = reader.commit(2)
        assert_snapshot_matches(work.open(keep_snapshots=KEEP).snapshot(2), want)
        assert manifest.keys == int(want.known.sum())
        assert set(work.files()) == expected_layout(reader), f"{where}: leftovers"

    try:
        runs = kill_at_every_step(server, tmp_path, "flush", prepare, check, op="flush",
                                  epoch=2, rank=3, keep_snapshots=KEEP, updates=str(updates))
    finally:
        helper_stderr = server.close()
    assert runs >= (2 if backend.name == "s3" else 4)  # locally: write, link, unlink, end
    assert "child failed" not in helper_stderr, helper_stderr


@pytest.mark.parametrize("backend", ["s3"], indirect=True)
def test_download_into_the_cache_killed_at_every_step(backend: Backend, tmp_path) -> None:
    """A killed download leaves no torn file where readers look; the next reader on the same
    cache gets exact scores, and its download removes the dead one's temporary."""
    refs = build_template(backend)
    manifest = backend.open().manifest(1)
    name = manifest.snapshot.rsplit("/", 1)[-1]
    server = CrashServer(tmp_path, backend.env)

    def prepare(k):
        return backend, backend.new_cache_dir()

    def check(work, cache_dir, reply, where):
        store = work.open(cache_dir=cache_dir)
        directory = cache.store_cache_dir(cache_dir, store.fs, store.root)
        final = os.path.join(directory, name)
        if os.path.exists(final):  # in place means whole
            assert os.path.getsize(final) == manifest.snapshot_bytes, where
        assert_snapshot_matches(store.snapshot(1), refs[1])
        assert sorted(os.listdir(directory)) == [name, f"{name}.lock"], where

    try:
        runs = kill_at_every_step(server, tmp_path, "fetch", prepare, check, op="fetch",
                                  epoch=1, keep_snapshots=KEEP)
    finally:
        helper_stderr = server.close()
    assert runs >= 4  # get_file, downloaded, replace, end
    assert "child failed" not in helper_stderr, helper_stderr


READER = REPO / "tests" / "storage" / "_reader_child.py"


@pytest.mark.parametrize("backend", ["local", "s3"], indirect=True)
def test_a_reader_during_commits_sees_whole_epochs(backend: Backend, tmp_path) -> None:
    """A reader process loops over lookups of every key while this process commits epoch after
    epoch (retention keeps one, so files vanish under the reader): every lookup matches one
    epoch's exact scores and mean, and it never sees an error."""
    n_keys, epochs = 2000, (24 if backend.name == "local" else 8)
    keys = key_strings(0, n_keys)
    hashes = ref_hashes(keys)
    np.save(tmp_path / "hashes.npy", hashes)
    store = backend.open(keep_snapshots=1)
    stop = tmp_path / "stop"
    args = tmp_path / "reader.json"
    args.write_text(json.dumps({"url": backend.url, "storage_options": backend.storage_options,
                                "cache_dir": backend.new_cache_dir(), "stop": str(stop),
                                "hashes": str(tmp_path / "hashes.npy"),
                                "out": str(tmp_path / "reader-out.json")}))
    reader = subprocess.Popen([sys.executable, str(READER), str(args)], cwd=REPO,
                              env=child_env(backend.env), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        ready = tmp_path / "reader-out.json.ready"
        deadline = time.monotonic() + 60
        while not ready.exists() and reader.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        for epoch in range(epochs):
            # epoch e writes the keys of parity e % 2: the other half carries over from e - 1
            half = np.arange(epoch % 2, n_keys, 2)
            with store.writer(epoch) as writer:
                writer.record(hashes[half], expected_scores(epoch, n_keys)[half])
            store.commit(epoch)
            time.sleep(0.02)
    finally:
        stop.touch()
        output, _ = reader.communicate(timeout=120)
    assert reader.returncode == 0, output
    seen = json.loads((tmp_path / "reader-out.json").read_text())
    assert seen["lookups"] > epochs and len(seen["epochs"]) >= 2, seen


from tests.storage._reader_child import expected_scores  # noqa: E402  (shared with the reader)

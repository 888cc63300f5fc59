"""A commit SIGKILLed at every step that changes the store.

For k = 0, 1, 2, ... a child process commits epoch 2 of a store holding epochs 0 and 1 (and
three ranks' deltas of epoch 2) and is killed just before its k-th write, rename or delete,
until a run finishes unkilled. After each kill, read in this process: every epoch the store
lists is intact (exact lookups), the interrupted epoch is fully there or absent (and then its
deltas are all still there), and running the commit again completes it, leaving a clean store.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from infobatch_stream.storage import layout

from .conftest import Backend
from .helpers import REPO, Reference, child_env, assert_snapshot_matches, key_strings, ref_hashes

HELPER = REPO / "tests" / "storage" / "_crash_commit.py"
KEEP = 2  # committing epoch 2 also retires epoch 0: its manifest and snapshot are deleted


def build_template(backend: Backend) -> dict[int, Reference]:
    """Epochs 0 and 1 committed, epoch 2 flushed by three ranks (overlapping keys)."""
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
    assert len(store.pending_deltas(2)) == 3
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
        self.stderr = open(tmp_path / "crash-helper.stderr", "w+")
        self.proc = subprocess.Popen([sys.executable, str(HELPER)], cwd=REPO, env=full_env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True)

    def commit(self, **request) -> dict:
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
            reply = server.commit(url=work.url, storage_options=work.storage_options,
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
            assert work.visible() == expected_layout(after), f"{where}: leftovers"
            # Besides, a kill leaves only what readers never look at: on S3 nothing; locally the
            # commit's work directory or a temporary hard link (nothing removes those yet).
            hidden = set(work.files()) - work.visible()
            if backend.name == "s3":
                assert not hidden, f"{where}: {hidden}"
            else:
                assert all(h.startswith((".tmp-commit-", "snapshots/.tmp-", "manifests/.tmp-"))
                           for h in hidden), f"{where}: {hidden}"
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

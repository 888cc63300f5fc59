"""ScoreStore end to end: record on several ranks, commit, reopen elsewhere; commit semantics,
retention, and the promise that no file is ever rewritten."""

from __future__ import annotations

import functools
import json
import pickle

import numpy as np
import pytest
import torch

from infobatch_stream.storage import Manifest, ScoreStore, StoreError, fsio, layout

from .conftest import Backend
from .helpers import Reference, assert_snapshot_matches, key_strings, ref_hashes, run_python, write_json

CHILD = __file__.replace("test_store.py", "_reopen_child.py")

# -- one million keys, three ranks, two epochs, read back by another process ----------------

N_KEYS = 1_000_000
N_EPOCH0 = 900_000  # keys [N_EPOCH0, N_KEYS) are first seen in epoch 1
N_UNKNOWN = 10_000


def _record(writer, rank: int, keys: list[str], hashes: np.ndarray, idx: np.ndarray,
            scores: np.ndarray) -> None:
    """Record as three kinds of trainer would: key strings, uint64 hashes, int64 tensors."""
    for start in range(0, len(idx), 65_536):  # batches, as a training loop would record
        part = idx[start:start + 65_536]
        values = scores[start:start + 65_536]
        if rank == 0:
            writer.record([keys[i] for i in part], values)
        elif rank == 1:
            writer.record(hashes[part], values)
        else:
            writer.record(torch.from_numpy(hashes[part].view(np.int64)), torch.from_numpy(values))


def _write_epoch(store: ScoreStore, ref: Reference, epoch: int, per_rank: list[list[np.ndarray]],
                 keys: list[str], rng: np.random.Generator) -> None:
    """Each rank flushes its chunks in turn, round robin: the flush order is the write order."""
    writers = [store.writer(epoch, rank=r) for r in range(len(per_rank))]
    for step in range(max(map(len, per_rank))):
        for rank, chunks in enumerate(per_rank):
            if step < len(chunks):
                idx = chunks[step]
                scores = rng.gamma(2.0, 1.0, len(idx)).astype(np.float32)
                _record(writers[rank], rank, keys, ref.hashes, idx, scores)
                writers[rank].flush()
                ref.write(epoch, idx, scores)


@functools.lru_cache(maxsize=1)
def _universe() -> tuple[list[str], np.ndarray]:
    keys = key_strings(0, N_KEYS)
    return keys, ref_hashes(keys)


def _two_epochs(store: ScoreStore) -> dict[int, Reference]:
    keys, hashes = _universe()
    ref = Reference(hashes)
    rng = np.random.default_rng(2024)
    # Epoch 0: overlapping ranges per rank (keys in an overlap are written twice).
    ranges = [(0, 350_000), (300_000, 650_000), (600_000, N_EPOCH0)]
    per_rank = [np.array_split(np.arange(lo, hi), 3) for lo, hi in ranges]
    _write_epoch(store, ref, 0, per_rank, keys, rng)
    store.commit(0)
    refs = {0: ref.copy()}
    # Epoch 1: a quarter of the old keys (the rest keep their epoch-0 score) and all new keys,
    # shuffled over ranks with overlaps; rank 0 also repeats keys within one flush.
    updates = rng.permutation(np.concatenate([np.arange(0, N_EPOCH0, 4), np.arange(N_EPOCH0, N_KEYS)]))
    size = len(updates) // 3
    per_rank = []
    for rank in range(3):
        mine = updates[rank * size:(rank + 1) * size + 5_000]
        if rank == 0:
            mine = np.concatenate([mine, mine[:2_000]])
        per_rank.append(np.array_split(mine, 2))
    _write_epoch(store, ref, 1, per_rank, keys, rng)
    store.commit(1)
    refs[1] = ref
    return refs


def test_a_million_keys_reopened_in_a_fresh_process(backend: Backend, tmp_path) -> None:
    refs = _two_epochs(backend.open())

    out = tmp_path / "child.npz"
    hashes = tmp_path / "hashes.npy"
    np.save(hashes, refs[1].hashes)
    args = write_json(tmp_path / "args.json", {  # a fresh cache: S3 snapshots are downloaded
        "url": backend.url, "storage_options": backend.storage_options,
        "cache_dir": backend.new_cache_dir(), "key_prefix": "sample-", "n_keys": N_KEYS,
        "hashes": str(hashes), "n_unknown": N_UNKNOWN, "out": str(out)})
    run_python(CHILD, args, env=backend.env)
    got = np.load(out)

    assert got["epochs"].tolist() == [0, 1] and int(got["latest"]) == 1
    for epoch, ref in refs.items():
        known = ref.known
        lookup = got[f"lookup_{epoch}"]
        assert lookup.dtype == np.float32
        assert np.array_equal(np.isnan(lookup), ~known), f"epoch {epoch}: known keys differ"
        assert np.array_equal(lookup[known], ref.scores[known]), f"epoch {epoch}: a score differs"
        assert np.isnan(got[f"unknown_{epoch}"]).all()
        assert int(got[f"len_{epoch}"]) == known.sum() == (N_EPOCH0 if epoch == 0 else N_KEYS)
        assert float(got[f"mean_{epoch}"]) == pytest.approx(ref.mean(), rel=1e-12, abs=0)
        hashes, scores, epochs = ref.sorted_columns()
        assert np.array_equal(got[f"hash_{epoch}"], hashes)  # sorted, one row per key
        assert np.array_equal(got[f"score_{epoch}"], scores)
        assert np.array_equal(got[f"epoch_{epoch}"], epochs)
        manifest = Manifest.from_json(str(got[f"manifest_{epoch}"]).encode())
        assert manifest.keys == known.sum()
        assert manifest.updated == len(ref.touched[epoch])
        assert manifest.duplicates == ref.duplicates(epoch) > 0
        assert manifest.mean == pytest.approx(ref.mean(), rel=1e-12, abs=0)
    assert set(np.unique(got["epoch_1"]).tolist()) == {0, 1}  # some keys only seen in epoch 0
    assert Manifest.from_json(str(got["manifest_1"]).encode()).new_keys == N_KEYS - N_EPOCH0


# -- commit semantics -------------------------------------------------------------------------

def _commit_epoch(store: ScoreStore, epoch: int, keys: list[str], scores: list[float],
                  rank: int = 0) -> Manifest:
    with store.writer(epoch, rank=rank) as writer:
        writer.record(keys, scores)
    return store.commit(epoch)


def test_an_empty_store(backend: Backend) -> None:
    store = backend.open()
    assert store.latest_epoch is None and store.epochs == [] and store.manifest() is None
    snap = store.snapshot()
    assert len(snap) == 0 and snap.mean is None and snap.epoch is None
    assert np.isnan(snap.lookup(["a", "b"])).all()
    assert backend.files() == {}  # reading creates nothing


def test_committing_a_committed_epoch_is_a_no_op(backend: Backend) -> None:
    store = backend.open()
    first = _commit_epoch(store, 0, ["a", "b"], [1.0, 2.0])
    before = backend.files()
    again = store.commit(0)
    assert again == first
    assert backend.open().commit(0) == first  # from another store object too
    assert backend.files() == before  # no new file, none rewritten or removed


def test_epochs_commit_in_order(backend: Backend) -> None:
    store = backend.open()
    with pytest.raises(StoreError, match="next commit must be epoch 0"):
        store.commit(1)
    _commit_epoch(store, 0, ["a"], [1.0])
    with pytest.raises(StoreError, match="latest committed epoch is 0"):
        store.commit(2)
    assert store.epochs == [0]
    with pytest.raises(ValueError):
        store.commit(-1)
    with pytest.raises(TypeError):
        store.commit("1")


def test_an_epoch_with_no_updates_carries_every_score_over(backend: Backend) -> None:
    store = backend.open()
    empty = store.commit(0)  # no deltas at all
    assert empty.keys == 0 and empty.mean is None and len(store.snapshot()) == 0
    _commit_epoch(store, 1, ["a", "b"], [1.0, 4.0])
    manifest = store.commit(2)
    assert manifest.keys == 2 and manifest.updated == 0 and manifest.mean == 2.5
    snap = store.snapshot(2)
    assert snap.lookup(["a", "b"]).tolist() == [1.0, 4.0]
    assert snap.epochs.tolist() == [1, 1]  # last written in epoch 1


def test_a_flush_after_commit_is_not_merged(backend: Backend) -> None:
    store = backend.open()
    committed = _commit_epoch(store, 0, ["a", "b"], [1.0, 2.0])
    late = store.writer(0, rank=1)
    late.record(["a", "c"], [50.0, 60.0])
    late.flush()
    assert store.commit(0) == committed
    assert store.snapshot(0).lookup(["a", "c"]).tolist()[0] == 1.0
    assert np.isnan(store.snapshot(0).lookup(["c"])).all()
    # nor into the next epoch: it holds epoch 0's updates
    _commit_epoch(store, 1, ["b"], [5.0])
    snap = store.snapshot(1)
    assert snap.lookup(["a", "b"]).tolist() == [1.0, 5.0]
    assert np.isnan(snap.lookup(["c"])).all()
    assert len(snap) == 2


def test_a_late_flush_is_warned_reported_and_removed_by_the_next_commit(backend: Backend,
                                                                         caplog) -> None:
    """A flush into an epoch already committed never reaches a snapshot: it is warned about
    when it is written, listed by ``leftover_deltas()``, and removed, reported, by the next
    commit's retention (it used to stay in deltas/ forever, silently)."""
    store = backend.open()
    _commit_epoch(store, 0, ["a", "b"], [1.0, 2.0])
    caplog.set_level("WARNING")
    late = store.writer(0, rank=1)
    late.record(["a", "c"], [50.0, 60.0])
    relpath = late.flush()
    assert "epoch 0 is already committed" in caplog.text and "never be merged" in caplog.text
    assert store.leftover_deltas() == {0: [relpath]}
    caplog.clear()
    _commit_epoch(store, 1, ["b"], [5.0])
    assert "1 delta file(s) of epoch 0 were never merged" in caplog.text and relpath in caplog.text
    assert store.leftover_deltas() == {}
    assert not any(p.startswith(layout.DELTAS) for p in backend.visible())


def test_merged_deltas_left_by_a_commit_killed_after_its_manifest(backend: Backend) -> None:
    """Its clean-up never ran and the epoch is never committed again: the next commit's
    retention removes the deltas every retained manifest names (quietly: they were merged)."""
    store = backend.open()
    manifest = _commit_epoch(store, 0, ["a"], [1.0])
    # Put the merged delta back, as a commit killed before its retention would have left it.
    for name in manifest.deltas:
        backend.write(name, b"merged already")
    assert store.leftover_deltas() == {0: list(manifest.deltas)}
    _commit_epoch(store, 1, ["a"], [2.0])
    assert store.leftover_deltas() == {}
    assert not any(p.startswith(layout.DELTAS) for p in backend.visible())


def test_a_commit_merges_only_its_own_runs_deltas(backend: Backend, caplog) -> None:
    """Deltas carry the id of the run that wrote them: a commit merges only its own run's.
    Another run's deltas, and deltas with no run id (plain use), are left out, and the
    warning says two runs are writing the store (an earlier version merged untagged deltas
    into a named run's commit, and a plain commit merged every run's)."""
    store = backend.open()
    with store.writer(0, rank=0, run_id="job-a") as writer:
        writer.record(["a"], [1.0])
    with store.writer(0, rank=0, run_id="job-b") as writer:
        writer.record(["b"], [2.0])
    with store.writer(0, rank=1) as writer:  # plain use: no run id
        writer.record(["c"], [3.0])
    caplog.set_level("WARNING")
    manifest = store.commit(0, run_id="job-a")
    assert "two runs are writing this store" in caplog.text and "keys collide" not in caplog.text
    assert "run 'job-b'" in caplog.text and "a run with no run id" in caplog.text
    assert len(manifest.deltas) == 1 and manifest.keys == 1 and manifest.duplicates == 0
    snap = store.snapshot(0)
    assert snap.lookup(["a"]).tolist() == [1.0] and np.isnan(snap.lookup(["b", "c"])).all()
    # without a run id (plain use), only deltas without one are merged
    other = backend.sibling("plain").open()
    with other.writer(0, run_id="job-b") as writer:
        writer.record(["b"], [2.0])
    with other.writer(0, rank=1) as writer:
        writer.record(["c"], [3.0])
    plain = other.commit(0)
    assert plain.keys == 1 and other.snapshot().lookup(["c"]).tolist() == [3.0]


def test_mean_is_float64_over_known_scores(backend: Backend) -> None:
    store = backend.open()
    rng = np.random.default_rng(3)
    scores = (rng.lognormal(0.0, 2.0, 20_000)).astype(np.float32)
    keys = key_strings(0, 20_000)
    manifest = _commit_epoch(store, 0, keys, scores)
    expected = float(np.mean(scores.astype(np.float64)))
    assert manifest.mean == pytest.approx(expected, rel=1e-12, abs=0)
    assert store.snapshot().mean == pytest.approx(expected, rel=1e-12, abs=0)
    assert manifest.score_sum == pytest.approx(float(scores.astype(np.float64).sum()), rel=1e-12)


def test_retention_keeps_the_last_snapshots_and_removes_the_rest(backend: Backend) -> None:
    store = backend.open(keep_snapshots=2)
    ref = Reference(ref_hashes(key_strings(0, 100)))
    refs = {}
    rng = np.random.default_rng(5)
    for epoch in range(5):
        if epoch == 3:
            # leftovers of a crashed attempt at epoch 3: a snapshot no manifest names; and a
            # snapshot of a later epoch (a commit in flight elsewhere), which must stay
            orphan = layout.snapshot_name(3, "0" * 32)
            backend.write(orphan, b"left by a crashed commit")
            future = layout.snapshot_name(9, "f" * 32)
            backend.write(future, b"not ours to remove")
        idx = rng.choice(100, 30, replace=False)
        scores = rng.random(30).astype(np.float32)
        with store.writer(epoch, rank=0) as writer:
            writer.record(ref.hashes[idx[:20]], scores[:20])
        with store.writer(epoch, rank=1) as writer:
            writer.record(ref.hashes[idx[20:]], scores[20:])
        ref.write(epoch, idx, scores)
        refs[epoch] = ref.copy()
        manifest = store.commit(epoch)

        kept = list(range(max(0, epoch - 1), epoch + 1))
        assert store.epochs == kept
        snapshots = {store.manifest(e).snapshot for e in kept}
        expected = {layout.MARKER} | {layout.manifest_name(e) for e in kept} | snapshots
        if epoch >= 3:
            expected.add(future)
        assert backend.visible() == expected, f"after committing epoch {epoch}"
        assert store.pending_deltas(epoch) == []
        assert not any(name in backend.visible() for name in manifest.deltas)
        for e in kept:
            assert_snapshot_matches(backend.open().snapshot(e), refs[e])
    with pytest.raises(StoreError, match="not committed"):
        store.snapshot(2)


def _versions(backend: Backend) -> dict[str, int]:
    """Versions of each key of a versioned bucket (S3 keeps every overwritten body)."""
    bucket = backend.root.split("/", 1)[0]
    counts: dict[str, int] = {}
    paginator_args = {"Bucket": bucket}
    while True:
        page = backend.fs.call_s3("list_object_versions", **paginator_args)
        for version in page.get("Versions", []):
            counts[version["Key"]] = counts.get(version["Key"], 0) + 1
        if not page.get("IsTruncated"):
            return counts
        paginator_args.update(KeyMarker=page["NextKeyMarker"],
                              VersionIdMarker=page["NextVersionIdMarker"])


def test_no_file_is_ever_rewritten(backend: Backend) -> None:
    if backend.name == "s3":  # every PUT of an existing key leaves a version behind
        bucket = backend.root.split("/", 1)[0]
        backend.fs.call_s3("put_bucket_versioning", Bucket=bucket,
                           VersioningConfiguration={"Status": "Enabled"})
    seen: dict[str, tuple] = {}

    def check(step: str) -> None:
        for path, identity in backend.files().items():
            assert seen.setdefault(path, identity) == identity, f"{path} rewritten at {step}"

    store = backend.open(keep_snapshots=2)
    rng = np.random.default_rng(11)
    keys = key_strings(0, 1000)
    for epoch in range(4):
        for rank in range(2):
            writer = store.writer(epoch, rank=rank)
            for _ in range(2):
                writer.record(rng.choice(keys, 300).tolist(), rng.random(300))
                writer.flush()
                check(f"flush {epoch}/{rank}")
        store.commit(epoch)
        check(f"commit {epoch}")
        store.commit(epoch)
        backend.open(keep_snapshots=2).commit(epoch)
        check(f"second commit {epoch}")
    assert len(seen) > 10
    if backend.name == "s3":
        versions = _versions(backend)
        assert versions and max(versions.values()) == 1, {k: v for k, v in versions.items() if v > 1}


def test_another_process_committing_first_wins_cleanly(backend: Backend, monkeypatch) -> None:
    """Two committers of one epoch: the exclusive create of the manifest picks one; the other
    removes its own snapshot and returns the winner's manifest."""
    store = backend.open()
    with store.writer(0) as writer:
        writer.record(["a", "b"], [1.0, 2.0])
    rival = backend.open()
    real_put = fsio.put_file
    raced = []

    def put_then_let_the_rival_commit(*args, **kwargs):
        real_put(*args, **kwargs)
        if not raced:  # our snapshot is uploaded, our manifest not yet written
            raced.append(True)
            monkeypatch.setattr(fsio, "put_file", real_put)
            raced.append(rival.commit(0))

    monkeypatch.setattr(fsio, "put_file", put_then_let_the_rival_commit)
    ours = store.commit(0)
    winner = raced[1]
    assert ours == winner
    assert backend.open().manifest(0) == winner
    snapshots = [p for p in backend.visible() if p.startswith(layout.SNAPSHOTS)]
    assert snapshots == [winner.snapshot]  # the loser's snapshot is gone
    assert backend.open().snapshot(0).lookup(["a", "b"]).tolist() == [1.0, 2.0]


@pytest.mark.parametrize("runs", [(None, None), ("job-a", "job-b")])
def test_a_committer_whose_deltas_the_winners_retention_removed(backend: Backend, monkeypatch,
                                                                 runs) -> None:
    """Two committers of one epoch; the rival commits, and its retention removes the deltas,
    while this one is still reading them. This one must not fail on a missing file (it did,
    or reported the vanished delta as damage): it returns the winner's manifest, or raises
    OwnershipError when the winner is another run."""
    from infobatch_stream.storage import OwnershipError
    from infobatch_stream.storage import selection as commit_module

    ours, theirs = runs
    store = backend.open()
    with store.writer(0, run_id=ours) as writer:
        writer.record(["a"], [1.0])
    with store.writer(0, rank=1, run_id=theirs) as writer:
        writer.record(["b"], [2.0])
    rival = backend.open()
    real_open = commit_module.open_delta
    raced = []

    def open_after_the_rival_committed(path, epoch, *args):
        if not raced:
            raced.append(None)  # the rival's own commit opens deltas through here too
            raced[0] = rival.commit(0, run_id=theirs)
        return real_open(path, epoch, *args)

    monkeypatch.setattr(commit_module, "open_delta", open_after_the_rival_committed)
    if ours == theirs:
        assert store.commit(0, run_id=ours) == raced[0]
    else:
        with pytest.raises(OwnershipError, match="belongs to run 'job-b'"):
            store.commit(0, run_id=ours)
    assert backend.open().manifest(0) == raced[0]
    assert not any(p.startswith((layout.DELTAS, ".tmp-")) for p in backend.files())


def test_a_store_pickles_for_dataloader_workers(backend: Backend) -> None:
    store = backend.open()
    _commit_epoch(store, 0, ["a", "b"], [1.0, 2.0])
    clone = pickle.loads(pickle.dumps(store))
    assert clone.url == store.url and clone.cache_dir == store.cache_dir
    assert clone.snapshot().lookup(["b", "a"]).tolist() == [2.0, 1.0]


def test_keep_snapshots_must_be_positive(backend: Backend) -> None:
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="keep_snapshots"):
            backend.open(keep_snapshots=bad)


def test_manifest_is_plain_json(backend: Backend) -> None:
    store = backend.open()
    manifest = _commit_epoch(store, 0, ["a", "b", "a"], [1.0, 2.0, 3.0], rank=7)
    data = json.loads(backend.read(layout.manifest_name(0)))
    assert data["format"] == layout.FORMAT and data["epoch"] == 0
    assert data["snapshot"] == manifest.snapshot
    assert data["keys"] == 2 and data["duplicates"] == 1 and data["mean"] == 2.5
    assert data["deltas"] == list(manifest.deltas) and len(data["deltas"]) == 1
    assert "-r00007-" in data["deltas"][0]


def test_a_snapshot_retired_while_its_file_is_being_mapped_is_not_reported_damaged(
        local_backend: Backend, monkeypatch) -> None:
    """A reader has checked the snapshot's size when another process commits two epochs and
    retention (keep_snapshots=1) removes the file before the reader maps it: the reader opens
    the newer epoch. (Mapping a vanished file read as a damaged one, CorruptStoreError: the
    reader-during-commits test caught it under load.)"""
    from infobatch_stream.storage import snapshot as snapshot_module

    committer = local_backend.open(keep_snapshots=1)
    for epoch in range(2):
        with committer.writer(epoch) as writer:
            writer.record(["a", "b"], [float(epoch), 1.0])
        committer.commit(epoch)
    reader = local_backend.open(keep_snapshots=1)
    real_open = snapshot_module.open_table_file
    reads = []

    def commit_more_first(path, *args, **kwargs):
        if not reads:
            reads.append(path)
            monkeypatch.setattr(snapshot_module, "open_table_file", real_open)  # for the commits
            for epoch in (2, 3):
                with committer.writer(epoch) as writer:
                    writer.record(["a"], [float(epoch)])
                committer.commit(epoch)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(snapshot_module, "open_table_file", commit_more_first)
    snap = reader.snapshot()
    assert "epoch-00000001" in reads[0]
    assert snap.epoch == 3 and snap.lookup(["a", "b"]).tolist() == [3.0, 1.0]

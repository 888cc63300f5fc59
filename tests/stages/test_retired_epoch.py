"""A reader whose epoch is retired while it opens it (a live run commits twice with
``keep_snapshots=1`` between the reader's listing and its open) opens the newer epoch, as
``store.snapshot()`` does: the stage, ``InfoBatch.plan()`` (both through ``epoch_to_train``)
and the CLI's ``inspect`` (tests/test_cli.py). The interleaving is staged, not timed."""

from __future__ import annotations

import numpy as np

import infobatch_stream as ibs
from infobatch_stream.stages.prune import _soft_prune, epoch_to_train

from .helpers import decisions, fill_store, keys_of, memory_samples, reference_weights

KEYS = keys_of(400)


def _scores(epoch: int) -> dict[str, float]:
    values = np.random.default_rng(epoch).lognormal(0.0, 0.75, len(KEYS)).astype(np.float32)
    return dict(zip(KEYS, values.tolist(), strict=True))


def _store_retiring_under_its_reader(tmp_path) -> ibs.ScoreStore:
    """A reader of a store at epoch 1 whose first manifest read is followed, before it opens
    the snapshot, by another process committing epochs 2 and 3 (retention keeps one)."""
    url = str(tmp_path / "scores")
    committer = ibs.ScoreStore(url, keep_snapshots=1)
    for epoch in (0, 1):
        fill_store(committer, _scores(epoch), epoch)
    reader = ibs.ScoreStore(url, keep_snapshots=1)
    real_read = reader.files.read
    staged = []

    def read_then_others_commit(relpath: str) -> bytes:
        data = real_read(relpath)
        if relpath.startswith("manifests/") and not staged:
            staged.append(relpath)
            for epoch in (2, 3):
                fill_store(committer, _scores(epoch), epoch)
        return data

    reader.files.read = read_then_others_commit
    reader.staged = staged
    return reader


def test_epoch_to_train_opens_the_newer_epoch_when_its_own_is_retired(tmp_path) -> None:
    reader = _store_retiring_under_its_reader(tmp_path)
    epoch, snapshot = epoch_to_train(reader)
    assert reader.staged == ["manifests/epoch-00000001.json"]  # the retirement was staged
    assert (epoch, snapshot.epoch) == (4, 3)
    assert snapshot.lookup(KEYS[:5]).tolist() == [np.float32(v) for v in list(_scores(3).values())[:5]]


def test_the_stage_prunes_from_the_newer_epoch_when_its_own_is_retired(tmp_path) -> None:
    reader = _store_retiring_under_its_reader(tmp_path)
    policy = ibs.InfoBatchPolicy(num_epochs=10, prune_ratio=0.5, seed=3)
    got = decisions(_soft_prune(memory_samples(KEYS), reader, policy))
    assert reader.staged
    expected = reference_weights(KEYS, _scores(3), epoch=4, num_epochs=10, seed=3)
    assert got == {k: w for k, w in expected.items() if w}


def test_an_empty_store_trains_epoch_zero_from_an_empty_snapshot(tmp_path) -> None:
    store = ibs.ScoreStore(str(tmp_path / "scores"))
    epoch, snapshot = epoch_to_train(store)
    assert epoch == 0 and snapshot.epoch is None and len(snapshot) == 0
    fill_store(store, _scores(0), 0)
    epoch, snapshot = epoch_to_train(store)
    assert epoch == 1 and snapshot.epoch == 0 and len(snapshot) == len(KEYS)

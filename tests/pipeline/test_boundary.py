"""The epoch boundary: end_epoch(wait=False) overlaps the commit, whatever needs the new
snapshot waits for it (and raises its error), and each epoch's metrics."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch

import infobatch_stream as ibs
from infobatch_stream.storage import store as store_module

from .test_infobatch import keys_of, run_epoch


class HeldCommit:
    """Holds every commit until ``release()``; counts the commits and notes what was seen."""

    def __init__(self, monkeypatch):
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.calls: list[int] = []
        original = store_module.commit_epoch

        def held(store, epoch, **kwargs):
            self.calls.append(epoch)
            self.entered.set()
            assert self.gate.wait(60), "the test never released the commit"
            return original(store, epoch, **kwargs)

        monkeypatch.setattr(store_module, "commit_epoch", held)

    def release(self) -> None:
        self.gate.set()

    def release_later(self, seconds: float = 0.2) -> None:
        threading.Timer(seconds, self.gate.set).start()


def one_epoch_overlapped(ib: ibs.InfoBatch, held: HeldCommit) -> None:
    ib.update(torch.tensor([0.5, 1.5, 2.5]), ["a", "b", "c"], [1.0, 1.0, 1.0])
    assert ib.end_epoch(wait=False) is None   # returns while the commit is held
    assert held.entered.wait(60)
    assert ib.store.latest_epoch is None       # not committed yet


class RecordingLoader:
    """A loader that notes the store's latest epoch when a DataLoader would start reading it."""

    def __init__(self, store: ibs.ScoreStore, batches: list):
        self.store, self.batches, self.epoch_at_iter = store, batches, "never"

    def __iter__(self):
        self.epoch_at_iter = self.store.latest_epoch
        return iter(self.batches)


def test_bound_of_the_next_epoch_waits_for_the_commit_before_starting_the_loader(tmp_path,
                                                                                 monkeypatch):
    held = HeldCommit(monkeypatch)
    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=4)
    one_epoch_overlapped(ib, held)
    loader = RecordingLoader(ib.store, [1, 2, 3])
    batches = ib.bound(loader)
    held.release_later()
    assert next(batches) == 1
    assert loader.epoch_at_iter == 0  # the workers of epoch 1 see snapshot 0, never none
    assert ib.epoch == 1


@pytest.mark.parametrize("call", [
    lambda ib: ib.wait(),
    lambda ib: ib.update(torch.ones(1), ["z"]),
    lambda ib: ib.plan(10),
    lambda ib: ib.plan_steps(10, 2),
    lambda ib: ib.state_dict(),
    lambda ib: ib.metrics(),
    lambda ib: ib.epoch,
    lambda ib: ib.weights_for(["a"]),
], ids=["wait", "update", "plan", "plan_steps", "state_dict", "metrics", "epoch", "weights_for"])
def test_what_needs_the_snapshot_waits_for_the_overlapped_commit(tmp_path, monkeypatch, call):
    held = HeldCommit(monkeypatch)
    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=4)
    one_epoch_overlapped(ib, held)
    held.release_later()
    call(ib)
    assert ib.store.latest_epoch == 0 and not ib._boundary.pending
    assert ib.epoch == 1


def test_wait_returns_the_manifest_and_state_names_the_committed_epoch(tmp_path, monkeypatch):
    held = HeldCommit(monkeypatch)
    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=4)
    one_epoch_overlapped(ib, held)
    held.release_later()
    assert ib.state_dict()["epoch"] == 1     # not 0: the checkpoint must not re-run epoch 0
    manifest = ib.wait()
    assert manifest.epoch == 0 and manifest.updated == 3
    assert ib.wait() is manifest             # nothing in flight: the last one again


def test_a_body_that_ended_its_epoch_overlapped_is_not_committed_twice(tmp_path, monkeypatch):
    held = HeldCommit(monkeypatch)
    held.release()
    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=3)
    seen = []
    for epoch in ib.epochs():
        ib.update(torch.ones(2), [f"a{epoch}", "b"])
        ib.end_epoch(wait=False)
        seen.append(epoch)
    assert seen == [0, 1, 2] and held.calls == [0, 1, 2]
    assert ib.store.latest_epoch == 2
    assert ib.store.snapshot(2).lookup(["a0", "a1", "a2", "b"]).tolist() == [1.0] * 4


def test_a_failed_overlapped_commit_is_raised_where_the_snapshot_is_needed(tmp_path, monkeypatch):
    def broken(store, epoch, **kwargs):
        raise OSError(f"disk full while committing epoch {epoch}")

    monkeypatch.setattr(store_module, "commit_epoch", broken)
    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=3)
    ib.update(torch.tensor([0.5, 1.5]), ["a", "b"], [1.0, 1.0])
    ib.end_epoch(wait=False)
    with pytest.raises(OSError, match="disk full while committing epoch 0"):
        ib.update(torch.tensor([9.0]), ["c"])
    assert ib.store.latest_epoch is None
    monkeypatch.undo()
    # The epoch is open again: its scores (flushed before the commit failed) and a late one
    # are committed by the retried boundary.
    ib.update(torch.tensor([2.5]), ["c"])
    assert ib.end_epoch().epoch == 0
    assert ib.store.snapshot(0).lookup(["a", "b", "c"]).tolist() == [0.5, 1.5, 2.5]


def test_a_failed_overlapped_commit_ends_the_epochs_loop(tmp_path, monkeypatch):
    def broken(store, epoch, **kwargs):
        raise OSError("bucket gone")

    monkeypatch.setattr(store_module, "commit_epoch", broken)
    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=3)
    seen = []
    with pytest.raises(OSError, match="bucket gone"):
        for epoch in ib.epochs():
            seen.append(epoch)
            ib.update(torch.ones(1), ["a"])
            ib.end_epoch(wait=False)
    assert seen == [0] and ib.store.latest_epoch is None


def test_metrics_of_each_epoch(tmp_path):
    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=4, delta=0.5)
    assert ib.metrics() is None
    keys = keys_of(3000)
    rng = np.random.default_rng(5)
    for epoch in ib.epochs():
        plan = ib.plan(len(keys))
        batches = list(ib.bound([keys[i:i + 100] for i in range(0, 3000, 100)],
                                gradient_accumulation_steps=2))
        losses = rng.exponential(size=3000).astype(np.float32)
        run_epoch(ib, keys, losses)
        trained = len(keys) - plan.pruned
        ib.end_epoch(wait=False)
        metrics = ib.metrics()
        json.dumps(metrics, allow_nan=False)  # plain values, for any logger
        manifest = ib.store.manifest(epoch)
        assert metrics["epoch"] == epoch
        assert metrics["samples_pruned"] == plan.pruned
        assert metrics["samples_trained"] == trained
        assert metrics["saved_fraction"] == pytest.approx(plan.pruned / len(keys))
        assert metrics["mean_score"] == manifest.mean == ib.store.snapshot(epoch).mean
        assert metrics["keys_updated"] == manifest.updated == trained
        assert metrics["optimizer_steps"] == len(batches) // 2 == 15
        assert metrics["annealing"] is (epoch >= 2)
        assert metrics["commit_seconds"] > 0 and metrics["blocking_seconds"] > 0
        if epoch == 1:
            assert 0.2 < metrics["saved_fraction"] < 0.5  # a pruning epoch
        if epoch in (0, 2, 3):
            assert metrics["samples_pruned"] == 0


def test_blocking_time_counts_only_what_the_training_loop_waited(tmp_path, monkeypatch):
    held = HeldCommit(monkeypatch)
    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=3)
    ib.update(torch.ones(2), ["a", "b"], [1.0, 1.0])
    start = time.perf_counter()
    ib.end_epoch(wait=False)
    in_end_epoch = time.perf_counter() - start
    assert held.entered.wait(60)
    time.sleep(0.3)                     # "evaluation": the commit is held meanwhile
    held.release()
    while ib._boundary._future is not None and not ib._boundary._future.done():
        time.sleep(0.01)
    start = time.perf_counter()
    metrics = ib.metrics()
    in_metrics = time.perf_counter() - start
    assert metrics["commit_seconds"] >= 0.3
    assert metrics["blocking_seconds"] <= in_end_epoch + in_metrics


def test_end_epoch_waiting_counts_the_whole_boundary_as_blocking(tmp_path):
    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=3)
    ib.update(torch.ones(2), ["a", "b"], [1.0, 1.0])
    start = time.perf_counter()
    ib.end_epoch()
    elapsed = time.perf_counter() - start
    metrics = ib.metrics()
    assert metrics["commit_seconds"] <= metrics["blocking_seconds"] <= elapsed

"""The step path: float32 weighting under autocast, the queue of device-to-host copies, and
no call on the loss that would wait for the GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import infobatch_stream as ibs
from infobatch_stream.pipeline import recorder
from infobatch_stream.pipeline.recorder import ScoreRecorder, weighted_mean


@pytest.fixture
def ib(tmp_path) -> ibs.InfoBatch:
    return ibs.InfoBatch(tmp_path / "store", num_epochs=6)


def test_bf16_loss_under_autocast_is_weighted_exactly_in_float32():
    rng = np.random.default_rng(0)
    loss = torch.tensor(rng.lognormal(size=512), dtype=torch.bfloat16, requires_grad=True)
    # A kept below-mean sample at r = 0.3 weighs 1/(1-0.3); bfloat16 would make it 1.4297.
    weights = np.where(rng.random(512) < 0.6, 1.0 / (1.0 - 0.3), 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = weighted_mean(loss, torch.from_numpy(weights))
    assert out.dtype == torch.float32
    exact = (loss.detach().double() * torch.from_numpy(weights).float().double()).mean()
    assert out.item() == pytest.approx(exact.item(), rel=2e-7)
    bf16_product = (loss.detach() * torch.from_numpy(weights).to(torch.bfloat16)).float().mean()
    assert abs(bf16_product.item() - exact.item()) > 1e3 * abs(out.item() - exact.item())
    out.backward()  # the gradient still reaches the bfloat16 loss
    assert loss.grad is not None and loss.grad.dtype == torch.bfloat16


def test_update_returns_float32_under_autocast(ib):
    loss = torch.tensor([0.3, 0.9, 2.7], dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ib.update(loss, ["a", "b", "c"], [1 / 0.7, 1.0, 1 / 0.7])
    exact = (loss.double() * torch.tensor([1 / 0.7, 1.0, 1 / 0.7]).float().double()).mean()
    assert out.dtype == torch.float32 and out.item() == pytest.approx(exact.item(), rel=2e-7)


class HeldEvent:
    """A CUDA event stand-in whose copy completes when the test says so."""

    def __init__(self, done: bool = False):
        self.done = done
        self.synchronized = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.synchronized = True
        self.done = True


def test_batches_reach_the_writer_in_call_order_however_late_their_copies_end(tmp_path,
                                                                             monkeypatch):
    events = [HeldEvent(), HeldEvent(done=True), HeldEvent(), HeldEvent()]
    handed = iter(events)
    monkeypatch.setattr(recorder, "copy_event", lambda device: next(handed))
    store = ibs.ScoreStore(tmp_path / "store")
    rec = ScoreRecorder(store.writer(0), batches_per_write=1)
    hashes = ibs.hash_keys(["a", "b"])
    rec.record(hashes, torch.tensor([1.0, 1.0]))
    rec.record(hashes, torch.tensor([2.0, 2.0]))   # its copy is done, but the first's is not
    assert rec.in_flight == 2 and rec.writer.pending == 0
    events[0].done = True
    rec.record(hashes, torch.tensor([3.0, 3.0]))   # polls: the first two land, in order
    assert rec.in_flight == 1 and rec.writer.pending == 4
    rec.record(ibs.hash_keys(["a"]), torch.tensor([4.0]))
    assert not any(e.synchronized for e in events)  # nothing so far waited for a copy
    rec.flush()                                     # waits for the last two, in order
    assert events[2].synchronized and events[3].synchronized and rec.in_flight == 0
    rec.close()
    assert rec.samples == 7
    snapshot = store.commit(0)
    # last write wins: a batch drained out of order would leave 3.0 for "a"
    assert store.snapshot(snapshot.epoch).lookup(["a", "b"]).tolist() == [4.0, 3.0]
    assert snapshot.duplicates == 5


def test_the_epoch_boundary_drains_copies_still_in_flight(ib, monkeypatch):
    held = HeldEvent()
    monkeypatch.setattr(recorder, "copy_event", lambda device: held)
    ib.update(torch.tensor([0.5, 1.5]), ["a", "b"], [1.0, 1.0])
    assert ib._recorder.in_flight == 1
    ib.end_epoch(wait=False)
    ib.wait()
    assert held.synchronized
    assert ib.store.snapshot(0).lookup(["a", "b"]).tolist() == [0.5, 1.5]


class Synced(Exception):
    pass


# What waits for the device when called on a CUDA tensor (or on anything derived from it).
BLOCKING = {torch.Tensor.cpu, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy,
            torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
            torch.Tensor.__index__, torch.Tensor.__array__, torch.Tensor.nonzero,
            torch.Tensor.any, torch.Tensor.all, torch.Tensor.equal}


class DeviceLoss(torch.Tensor):
    """A loss that raises on every call that would wait for the GPU, and on a device copy
    made without ``non_blocking=True``; every tensor computed from it is one too."""

    armed = False

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if cls.armed:
            if func in BLOCKING:
                raise Synced(func.__name__)
            moves = func in (torch.Tensor.copy_, torch.Tensor.to, torch.Tensor.cuda)
            if moves and any(isinstance(a, DeviceLoss) for a in args) \
                    and not kwargs.get("non_blocking", False):
                raise Synced(f"{func.__name__} without non_blocking=True")
        return super().__torch_function__(func, types, args, kwargs)


@pytest.fixture
def armed():
    DeviceLoss.armed = True
    yield
    DeviceLoss.armed = False


def test_the_detector_catches_the_old_step_path(armed):
    loss = torch.rand(4).as_subclass(DeviceLoss)
    with pytest.raises(Synced, match="cpu"):
        loss.detach().float().cpu()     # what update() did before
    with pytest.raises(Synced, match="non_blocking"):
        torch.empty(4).copy_(loss)


@pytest.mark.parametrize("keys", ["strings", "key_hash_tensor"])
def test_update_calls_nothing_on_the_loss_that_waits_for_the_device(ib, armed, keys):
    names = [f"k{i}" for i in range(8)]
    batch_keys = names if keys == "strings" else torch.from_numpy(
        ibs.hash_keys(names).view(np.int64))
    loss = torch.rand(8, requires_grad=True).as_subclass(DeviceLoss)
    weights = torch.full((8,), 1 / 0.7, dtype=torch.float64)
    out = ib.update(loss, batch_keys, weights)
    also = ib.update(loss * 2, batch_keys, weights, scores=loss.detach() + 1)
    DeviceLoss.armed = False
    assert out.dtype == torch.float32 and also.dtype == torch.float32
    ib.end_epoch()
    expected = (loss.detach() + 1).float().numpy()
    np.testing.assert_array_equal(ib.store.snapshot(0).lookup(names), expected)


def test_weights_that_do_not_match_the_batch_are_refused(ib):
    with pytest.raises(ValueError, match="weights of shape"):
        ib.update(torch.ones(3), ["a", "b", "c"], [1.0])
    with pytest.raises(ValueError, match="scores of shape"):
        ib.update(torch.ones(2), ["a", "b"], scores=[1.0, 2.0, 3.0])


def test_a_full_delta_is_handed_to_the_writer_without_waiting_for_the_group(tmp_path):
    """flush_rows keeps its meaning: that many rows buffered start a delta, however few
    batches they took (a crash then keeps them)."""
    store = ibs.ScoreStore(tmp_path / "store")
    rec = ScoreRecorder(store.writer(0, flush_rows=20))
    rec.record(ibs.hash_keys([f"a{i}" for i in range(10)]), torch.ones(10))
    assert rec.in_flight == 1 and not rec.writer.files_written
    rec.record(ibs.hash_keys([f"b{i}" for i in range(10)]), torch.ones(10))
    assert rec.in_flight == 0 and len(rec.writer.files_written) == 1
    rec.close()

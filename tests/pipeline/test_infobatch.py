"""InfoBatch's training-side API: update, epochs, end_epoch, bound, planning, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import infobatch_stream as ibs
from infobatch_stream.stages.prune import _soft_prune


def keys_of(n: int, prefix: str = "k") -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


def run_epoch(ib: ibs.InfoBatch, keys: list[str], losses: np.ndarray) -> None:
    """Train one epoch on samples the stage lets through, recording ``losses`` (by key)."""
    by_key = dict(zip(keys, losses, strict=True))
    samples = list(_soft_prune([{"__key__": k} for k in keys], ib.store, ib.policy))
    kept = [s["__key__"] for s in samples]
    if kept:
        ib.update(torch.tensor([by_key[k] for k in kept]), kept,
                  [s["__weight__"] for s in samples])


@pytest.fixture
def ib(tmp_path) -> ibs.InfoBatch:
    return ibs.InfoBatch(tmp_path / "store", num_epochs=6)


def test_update_records_detached_scores_and_returns_weighted_mean(ib):
    loss = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    out = ib.update(loss, ["a", "b", "c"], [1.0, 2.0, 1.0])
    assert out.item() == pytest.approx((1 + 4 + 3) / 3)
    out.backward()
    assert loss.grad.tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 3])
    ib.end_epoch()
    assert ib.store.snapshot(0).lookup(["a", "b", "c"]).tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_update_accepts_any_float_dtype_and_weights_in_float32(ib, dtype):
    loss = torch.tensor([0.5, 1.5], dtype=dtype)
    out = ib.update(loss, ["a", "b"], torch.tensor([2.0, 1.0], dtype=torch.float64))
    assert out.dtype == torch.float32 and out.item() == 1.25
    ib.end_epoch()
    assert ib.store.snapshot(0).lookup(["a", "b"]).tolist() == [0.5, 1.5]


def test_update_accepts_key_hashes_from_the_stage(ib):
    hashes = torch.tensor(ibs.hash_keys(["a", "b"]).view(np.int64))  # a collated __key_hash__
    ib.update(torch.tensor([0.25, 0.75]), hashes)
    ib.end_epoch()
    assert ib.store.snapshot(0).lookup(["a", "b"]).tolist() == [0.25, 0.75]


@pytest.mark.parametrize("keys", [
    torch.tensor([3, 0, 7, 1]),                       # a label tensor (int64)
    torch.arange(4, dtype=torch.int32),               # dataset indices
    np.array([4, 2, 2, 9], np.uint8),
    [5, 1, 0, 2],                                      # a list of ints
    torch.tensor([-1, 3, 3, 0]),                      # labels with an "ignore" -1
])
def test_labels_or_indices_as_keys_are_refused_naming_the_fields(ib, keys):
    with pytest.raises(ValueError, match=r"small integers.*'__key__'.*'__key_hash__'"):
        ib.update(torch.ones(4), keys)
    with pytest.raises(ValueError, match="small integers"):
        ib.weights_for(keys)
    ib.end_epoch()
    assert len(ib.store.snapshot(0)) == 0  # nothing was recorded


@pytest.mark.parametrize("keys", [torch.tensor([0.0, 1.0]), np.array([2.5, 1.0], np.float32),
                                  [0.5, 1.5], torch.tensor([1.0, 2.0], dtype=torch.bfloat16)])
def test_float_keys_are_refused_naming_the_fields(ib, keys):
    with pytest.raises(TypeError, match=r"floating-point.*'__key__'.*'__key_hash__'"):
        ib.update(torch.ones(2), keys)


def test_real_key_hashes_pass_whatever_the_batch_size(ib):
    hashes = ibs.hash_keys([f"s{i}" for i in range(2000)])
    # every batch of one real hash; a real hash below 2**32 has probability 2**-32
    for signed in torch.tensor(hashes.view(np.int64)).split(1):
        ib.update(torch.ones(1), signed)
    ib.update(torch.ones(2), ["0", "1"])   # key strings that are digits are still strings
    ib.end_epoch()
    assert len(ib.store.snapshot(0)) == 2002


def test_low_level_hashing_still_takes_precomputed_integer_hashes(tmp_path):
    store = ibs.ScoreStore(str(tmp_path / "s"))
    with store.writer(0) as writer:
        writer.record(np.arange(3, dtype=np.uint64), np.ones(3, np.float32))
    store.commit(0)
    assert store.snapshot(0).lookup(np.arange(3, dtype=np.uint64)).tolist() == [1.0, 1.0, 1.0]


def test_update_rejects_reduced_or_mismatched_losses(ib):
    with pytest.raises(ValueError, match="reduction='none'"):
        ib.update(torch.tensor(1.0), ["a"])
    with pytest.raises(ValueError, match="2 losses but 3 keys"):
        ib.update(torch.ones(2), ["a", "b", "c"])


def test_shard_keys_need_key_hashes_in_update(tmp_path):
    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=4, key="shard")
    with pytest.raises(TypeError, match="__key_hash__"):
        ib.update(torch.ones(1), ["000001"])


def test_weights_recomputed_from_keys_equal_the_stages(ib):
    rng = np.random.default_rng(0)
    keys = keys_of(2000)
    run_epoch(ib, keys, rng.exponential(size=2000).astype(np.float32))
    ib.end_epoch()
    samples = list(_soft_prune([{"__key__": k} for k in keys], ib.store, ib.policy))
    kept = [s["__key__"] for s in samples]
    assert 0 < len(kept) < len(keys)
    assert ib.weights_for(kept).tolist() == [s["__weight__"] for s in samples]
    loss = torch.rand(len(kept))
    given = ib.update(loss, kept, [s["__weight__"] for s in samples])
    recomputed = ib.update(loss, kept)
    assert given.item() == pytest.approx(recomputed.item())
    dropped = sorted(set(keys) - set(kept))
    assert not ib.weights_for(dropped).any()  # the stage dropped them: weight 0


def test_epochs_resume_from_the_store_and_commit_once(tmp_path):
    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=4)
    seen = []
    for epoch in ib.epochs():
        ib.update(torch.ones(2), ["a", "b"])
        seen.append(epoch)
        if epoch == 1:
            manifest = ib.end_epoch()  # inside the loop: the loop must not commit again
            assert manifest.epoch == 1
            assert ib.store.latest_epoch == 1
            break
    assert seen == [0, 1]
    # A new InfoBatch on the same store (a restart) starts at the first uncommitted epoch.
    again = ibs.InfoBatch(tmp_path / "store", num_epochs=4)
    assert list(again.epochs()) == [2, 3]
    assert again.store.latest_epoch == 3
    assert list(ibs.InfoBatch(tmp_path / "store", num_epochs=4).epochs()) == []


def test_leaving_the_loop_by_an_exception_commits_nothing(ib):
    with pytest.raises(RuntimeError):
        for _epoch in ib.epochs():
            ib.update(torch.ones(1), ["a"])
            raise RuntimeError("training diverged")
    assert ib.store.latest_epoch is None


def test_bound_single_process_yields_everything_without_a_plan(ib):
    assert list(ib.bound(range(7))) == list(range(7))


def test_plan_counts_exactly_what_the_stage_keeps(ib):
    rng = np.random.default_rng(1)
    keys = keys_of(5000)
    run_epoch(ib, keys, rng.gamma(2.0, size=5000).astype(np.float32))
    ib.end_epoch()
    plan = ib.plan(dataset_size=5100)  # 100 keys the store has never seen
    batch = [{"__key__": k} for k in keys + keys_of(100, "new")]
    kept = list(_soft_prune(batch, ib.store, ib.policy))
    assert plan.epoch == 1 and plan.known == 5000 and plan.unseen == 100
    assert plan.samples == len(kept)
    below = np.count_nonzero(ib.store.snapshot().scores < ib.store.snapshot().mean)
    assert plan.expected_saved_fraction == pytest.approx(0.5 * below / 5100)


def test_state_dict_is_json_and_round_trips(tmp_path, ib):
    ib.update(torch.ones(1), ["a"])
    ib.plan_steps(dataset_size=100, batch_size=10)
    ib.end_epoch()
    state = json.loads(json.dumps(ib.state_dict()))
    other = ibs.InfoBatch(tmp_path / "store", num_epochs=6)
    other.load_state_dict(state)
    assert other.state_dict() == state
    assert other.epoch == 1


def test_load_state_dict_refuses_other_settings(tmp_path, ib):
    state = ib.state_dict()
    with pytest.raises(ValueError, match=r"prune_ratio=0\.5"):
        ibs.InfoBatch(tmp_path / "store", num_epochs=6, prune_ratio=0.3).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=0"):
        ibs.InfoBatch(tmp_path / "store", num_epochs=6, seed=1).load_state_dict(state)


def test_load_state_dict_checks_the_store_against_the_checkpoint(tmp_path, ib):
    for _ in range(2):
        ib.update(torch.ones(1), ["a"])
        ib.end_epoch()
    state = ib.state_dict()
    assert state["epoch"] == 2
    fresh = ibs.InfoBatch(tmp_path / "other-store", num_epochs=6)
    with pytest.raises(ValueError, match="committed only up to epoch -1"):
        fresh.load_state_dict(state)
    older = dict(state, epoch=1)
    with pytest.warns(UserWarning, match="continues at epoch 2"):
        ibs.InfoBatch(tmp_path / "store", num_epochs=6).load_state_dict(older)


def test_plan_steps_budget_keeps_every_epoch_within_the_total(tmp_path):
    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=5)
    plan = ib.plan_steps(dataset_size=1000, batch_size=10)
    assert plan.epochs[0].exact and plan.epochs[-1].exact and not plan.epochs[1].exact
    # Epoch 0 is exact (nothing known); 1-3 assume P(score < mean) = 0.5; 4 anneals, exact.
    assert [e.steps for e in plan.epochs] == [100, 75, 75, 75, 100]
    rng = np.random.default_rng(2)
    keys = keys_of(1000)
    taken = []
    for _epoch in ib.epochs():
        batches = list(ib.bound([keys[i:i + 10] for i in range(0, 1000, 10)]))
        taken.append(len(batches))
        run_epoch(ib, keys, rng.exponential(size=1000).astype(np.float32))
    assert sum(taken) <= plan.total_steps
    assert taken[0] == 100 and taken[-1] <= 100


def test_a_second_run_on_the_same_store_is_refused(tmp_path):
    first = ibs.InfoBatch(tmp_path / "store", num_epochs=4, run_id="job-a")
    first.update(torch.ones(1), ["x"])
    first.end_epoch()
    second = ibs.InfoBatch(tmp_path / "store", num_epochs=4, run_id="job-b")
    with pytest.raises(ibs.OwnershipError, match=r"belongs to run 'job-a'.*takeover=True"):
        second.update(torch.ones(1), ["x"])
    with pytest.raises(ibs.OwnershipError):  # the store refuses the commit too
        second.store.commit(1, run_id="job-b")
    assert second.store.latest_epoch == 0
    taker = ibs.InfoBatch(tmp_path / "store", num_epochs=4, run_id="job-b", takeover=True)
    taker.update(torch.ones(1), ["x"])
    assert taker.end_epoch().run_id == "job-b"


def test_a_restart_of_the_same_run_is_never_refused(tmp_path, monkeypatch):
    """torchrun gives every launch a new TORCHELASTIC_RUN_ID: it is not the run's identity, so
    a job relaunched before its first checkpoint is the same run; a run_id given by the user
    comes back with the checkpoint."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-1")
    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=4)
    ib.update(torch.ones(1), ["x"])
    assert ib.end_epoch().run_id is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-2")  # crashed; relaunched, no checkpoint
    relaunched = ibs.InfoBatch(tmp_path / "store", num_epochs=4)
    relaunched.update(torch.ones(1), ["x"])
    assert relaunched.end_epoch().epoch == 1

    named = ibs.InfoBatch(tmp_path / "named", num_epochs=4, run_id="job-7")
    named.update(torch.ones(1), ["x"])
    state = named.end_epoch() and named.state_dict()
    restarted = ibs.InfoBatch(tmp_path / "named", num_epochs=4)  # the id comes with the state
    restarted.load_state_dict(state)
    restarted.update(torch.ones(1), ["x"])
    assert restarted.end_epoch().run_id == "job-7"


def test_plain_use_without_run_ids_keeps_working(tmp_path):
    for _ in range(2):
        ib = ibs.InfoBatch(tmp_path / "store", num_epochs=4)
        ib.update(torch.ones(1), ["x"])
        assert ib.end_epoch().run_id is None


def test_a_restart_finishes_the_clean_up_of_a_commit_killed_after_its_manifest(tmp_path,
                                                                                monkeypatch):
    """The epoch is committed, so a restarted job never commits it again; ``epochs()`` finishes
    its clean-up before training on (here the killed commit was the run's last epoch)."""
    from infobatch_stream.storage import retention

    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=2)
    for epoch in ib.epochs():
        ib.update(torch.ones(2), ["a", "b"])
        if epoch == 1:
            def killed(*args, **kwargs):  # dies right after writing the manifest
                raise KeyboardInterrupt
            monkeypatch.setattr(retention, "retain", killed)
            with pytest.raises(KeyboardInterrupt):
                ib.end_epoch()
            break
    monkeypatch.undo()
    store = ibs.ScoreStore(tmp_path / "store")
    assert store.latest_epoch == 1 and store.leftover_deltas() == {1: list(store.manifest(1).deltas)}
    restarted = ibs.InfoBatch(tmp_path / "store", num_epochs=2)
    assert list(restarted.epochs()) == []  # nothing left to train ...
    assert store.leftover_deltas() == {}   # ... and nothing left behind


@pytest.mark.parametrize("name, value", [
    ("num_epochs", 0), ("num_epochs", 2.5), ("num_epochs", True), ("num_epochs", "3"),
    ("flush_rows", 0), ("flush_rows", -1), ("flush_rows", 1.5), ("flush_rows", True),
    ("run_id", ""), ("run_id", 7), ("window", 0), ("prune_ratio", 1.0), ("delta", float("nan")),
    ("seed", -1), ("seed", 2**64),
])
def test_bad_settings_are_refused_naming_the_setting(tmp_path, name, value):
    kwargs = {"num_epochs": 4, name: value}
    with pytest.raises((ValueError, TypeError), match=name):
        ibs.InfoBatch(tmp_path / "store", **kwargs)


def test_a_low_first_estimate_is_spread_over_the_remaining_epochs(tmp_path):
    """Left-skewed losses put fewer than half the samples below the mean, so the later epochs
    need more steps than the prior planned: each gives up a share, none is cut to pay for all."""
    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=8)
    plan = ib.plan_steps(dataset_size=2000, batch_size=10)
    rng = np.random.default_rng(3)
    keys = keys_of(2000)
    taken, exact = [], []
    with pytest.warns(UserWarning, match="the step budget") as cuts:  # a cut is never silent
        for _epoch in ib.epochs():
            exact.append(ib.plan(2000).samples // 10)
            batches = list(ib.bound([keys[i:i + 10] for i in range(0, 2000, 10)]))
            taken.append(len(batches))
            run_epoch(ib, keys, (10.0 - rng.exponential(size=2000)).astype(np.float32))
    assert len(cuts) == sum(t < e for t, e in zip(taken, exact, strict=True))
    assert sum(taken) <= plan.total_steps
    assert plan.total_steps - sum(taken) <= max(taken)
    shares = [t / e for t, e in zip(taken, exact, strict=True)]
    assert min(shares) > 0.85, shares  # a front-loaded cut would take ~30% of epoch 1
    assert shares[0] == 1.0  # epoch 0 was planned exactly


def test_update_records_given_scores_but_returns_the_weighted_loss(ib):
    loss = torch.tensor([1.0, 4.0])
    out = ib.update(loss, ["a", "b"], [1.0, 1.0], scores=torch.tensor([0.5, 0.25]))
    assert out.item() == pytest.approx(2.5)
    ib.end_epoch()
    assert ib.store.snapshot(0).lookup(["a", "b"]).tolist() == [0.5, 0.25]

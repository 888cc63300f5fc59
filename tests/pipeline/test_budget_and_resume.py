"""The step budget never cuts an epoch silently; checkpoints taken where the README says
resume silently; misuse (end_epoch twice, update after the last epoch, another world size,
another plan) gets a clear answer instead of a quietly wrong run."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import infobatch_stream as ibs
from infobatch_stream.stages.prune import _soft_prune

BATCH = 10


def keys_of(n: int) -> list[str]:
    return [f"k{i:05d}" for i in range(n)]


def kept_batches(ib: ibs.InfoBatch, keys: list[str]) -> list[list[dict]]:
    """The epoch's batches as the stage would hand them over (drop_last, like the plan)."""
    kept = list(_soft_prune([{"__key__": k} for k in keys], ib.store, ib.policy))
    return [kept[i:i + BATCH] for i in range(0, len(kept) - BATCH + 1, BATCH)]


def train(ib: ibs.InfoBatch, keys: list[str], losses: np.ndarray, sched=None) -> list[int]:
    """The README's OneCycleLR recipe: samples trained per epoch (the scheduler must never overrun)."""
    by_key = dict(zip(keys, losses.tolist(), strict=True))
    trained = []
    for _epoch in ib.epochs():
        count = 0
        for batch in ib.bound(kept_batches(ib, keys)):
            batch_keys = [s["__key__"] for s in batch]
            ib.update(torch.tensor([by_key[k] for k in batch_keys]), batch_keys,
                      [s["__weight__"] for s in batch])
            if sched is not None:
                sched.optimizer.step()
                sched.step()  # OneCycleLR raises "Tried to step ... times" past its total
            count += len(batch)
        trained.append(count)
    return trained


@pytest.mark.parametrize("name, draw", [
    ("cross-entropy-like", lambda rng, n: rng.exponential(size=n)),  # P(below mean) ~0.63
    ("heavy-tailed", lambda rng, n: rng.lognormal(0.0, 1.5, size=n)),  # ~0.77
    ("diffusion-like", lambda rng, n: rng.gamma(4.0, size=n)),  # ~0.57
])
def test_the_onecycle_recipe_trains_every_sample_the_plan_promised(tmp_path, name, draw):
    """``plan_steps`` before any score exists, then OneCycleLR on its total: every epoch
    trains what the stage kept (within one batch: drop_last), and the schedule never
    overruns. (With the old prior, each pruned epoch lost ~15% of its samples.)"""
    n = 2000
    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=8)
    plan = ib.plan_steps(dataset_size=n, batch_size=BATCH)
    param = torch.nn.Parameter(torch.zeros(1))
    sched = torch.optim.lr_scheduler.OneCycleLR(torch.optim.SGD([param], lr=0.1), max_lr=0.1,
                                                total_steps=plan.total_steps)
    rng = np.random.default_rng(7)
    keys = keys_of(n)
    promised = []
    orig_epochs = ib.epochs

    def epochs_recording_the_plan():
        for epoch in orig_epochs():
            promised.append(ib.plan(n).samples)
            yield epoch

    ib.epochs = epochs_recording_the_plan
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no cut may be warned about either
        trained = train(ib, keys, draw(rng, n).astype(np.float32), sched)
    assert len(trained) == 8
    for epoch, (got, want) in enumerate(zip(trained, promised, strict=True)):
        assert want - BATCH < got <= want, (name, epoch, trained, promised)
    assert sum(trained) < 8 * n  # pruning really happened


def test_a_budget_too_small_cuts_with_a_warning_that_gives_the_size(tmp_path):
    """Left-skewed losses put fewer than half the samples below the mean: pruning saves less
    than even the safe prior planned. The cut is spread over the remaining epochs and each
    cut epoch says how many steps and samples it lost."""
    n = 2000
    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=8)
    plan = ib.plan_steps(dataset_size=n, batch_size=BATCH)
    rng = np.random.default_rng(3)
    keys = keys_of(n)
    losses = (10.0 - rng.exponential(size=n)).clip(0.01).astype(np.float32)
    with pytest.warns(UserWarning, match=r"epoch \d: the step budget .* takes \d+ of its \d+ "
                                         r"steps \(\d+ steps, \d+ samples per rank not trained\)"):
        trained = train(ib, keys, losses)
    assert sum(trained) // BATCH <= plan.total_steps
    assert plan.total_steps - sum(trained) // BATCH <= max(trained) // BATCH


def test_end_epoch_twice_commits_no_empty_epoch(tmp_path):
    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=4)
    ib.update(torch.tensor([1.0, 2.0]), ["a", "b"])
    first = ib.end_epoch()
    with pytest.warns(UserWarning, match="end_epoch\\(\\) called again after epoch 0"):
        again = ib.end_epoch()
    assert again == first and ib.store.latest_epoch == 0
    ib.update(torch.tensor([3.0]), ["a"])  # the next epoch begins as usual
    assert ib.end_epoch().epoch == 1


def test_update_after_the_last_epoch_is_a_clear_error(tmp_path):
    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=2)
    for _epoch in ib.epochs():
        ib.update(torch.ones(1), ["a"])
    with pytest.raises(RuntimeError, match="all 2 epochs of this run are committed"):
        ib.update(torch.ones(1), ["a"])
    assert ib.store.latest_epoch == 1


def test_plan_steps_with_other_values_is_refused_unless_replanned(tmp_path):
    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=4)
    plan = ib.plan_steps(dataset_size=100, batch_size=10)
    assert ib.plan_steps(dataset_size=100, batch_size=10) is plan
    with pytest.raises(ValueError, match=r"batch_size=20 \(planned 10\)"):
        ib.plan_steps(dataset_size=100, batch_size=20)
    replanned = ib.plan_steps(dataset_size=100, batch_size=20, replan=True)
    assert replanned.batch_size == 20 and replanned.total_steps < plan.total_steps


def test_a_checkpoint_resumed_on_another_world_size_is_refused(tmp_path):
    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=4)
    ib.plan_steps(dataset_size=100, batch_size=10, world_size=2)  # as planned on 2 ranks
    ib.update(torch.ones(1), ["a"])
    ib.end_epoch()
    state = ib.state_dict()
    resumed = ibs.InfoBatch(tmp_path / "store", num_epochs=4)  # this process is 1 rank
    resumed.load_state_dict(state)
    with pytest.raises(RuntimeError, match=r"planned for 2 rank\(s\) and this run has 1"):
        next(iter(resumed.bound(range(5))))
    with pytest.raises(ValueError, match=r"world_size=1 \(planned 2\)"):
        resumed.plan_steps(dataset_size=100, batch_size=10)


@pytest.mark.parametrize("where", ["end of the loop body", "after end_epoch"])
def test_checkpoints_where_the_readme_says_resume_silently(tmp_path, where):
    n = 200
    keys = keys_of(n)
    losses = np.random.default_rng(0).exponential(size=n).astype(np.float32)
    by_key = dict(zip(keys, losses.tolist(), strict=True))
    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=4)
    plan = ib.plan_steps(dataset_size=n, batch_size=BATCH)
    state = None
    for epoch in ib.epochs():
        for batch in ib.bound(kept_batches(ib, keys)):
            batch_keys = [s["__key__"] for s in batch]
            ib.update(torch.tensor([by_key[k] for k in batch_keys]), batch_keys,
                      [s["__weight__"] for s in batch])
        if where == "after end_epoch":
            ib.end_epoch()
        state = ib.state_dict()  # the checkpoint of this epoch
        if epoch == 1:
            break  # "killed" right after saving; the loop body's own commit still ran?
    if where == "end of the loop body":
        ib.end_epoch()  # the commit the loop body's end would have made
    steps_taken = ib.state_dict()["steps_done"]
    resumed = ibs.InfoBatch(tmp_path / "store", num_epochs=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.load_state_dict(state)
    assert resumed.epoch == 2
    assert resumed.state_dict()["steps_done"] == steps_taken
    assert resumed.plan_steps(dataset_size=n, batch_size=BATCH).total_steps == plan.total_steps


def test_a_checkpoint_from_inside_bound_whose_epoch_was_committed_warns(tmp_path):
    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=4)
    for step, batch in enumerate(ib.bound([["a"], ["b"], ["c"]])):
        ib.update(torch.ones(1), batch)
        if step == 0:
            mid_epoch = ib.state_dict()
    ib.end_epoch()
    with pytest.warns(UserWarning, match="taken in epoch 0, mid-epoch"):
        ibs.InfoBatch(tmp_path / "store", num_epochs=4).load_state_dict(mid_epoch)


def test_the_store_refuses_other_settings_without_a_checkpoint(tmp_path):
    """The same store reopened with another prune_ratio or num_epochs and no checkpoint is
    refused before training, both values shown; takeover=True continues on purpose."""
    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=4)
    ib.update(torch.ones(2), ["a", "b"])
    ib.end_epoch()
    for kwargs, shown in (({"num_epochs": 4, "prune_ratio": 0.3}, "prune_ratio=0.5"),
                          ({"num_epochs": 6}, "num_epochs=4")):
        other = ibs.InfoBatch(tmp_path / "store", **kwargs)
        with pytest.raises(ibs.SettingsMismatchError, match=shown) as info:
            other.update(torch.ones(1), ["a"])
        assert str(kwargs.get("prune_ratio", kwargs["num_epochs"])) in str(info.value)
        assert ibs.ScoreStore(tmp_path / "store").latest_epoch == 0
    taken = ibs.InfoBatch(tmp_path / "store", num_epochs=6, takeover=True)
    taken.update(torch.ones(1), ["a"])
    assert taken.end_epoch().epoch == 1

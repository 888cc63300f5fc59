"""Gradient accumulation: bound() and plan_steps() count optimizer steps, and an epoch ends
on an accumulation boundary."""

from __future__ import annotations

import json

import numpy as np
import pytest

import infobatch_stream as ibs
from infobatch_stream.pipeline.planning import StepPlan
from infobatch_stream.pipeline.steps import equal_steps

from .test_infobatch import keys_of, run_epoch


def test_equal_steps_yields_whole_groups_only():
    assert [len(g) for g in equal_steps(range(10), None, 3)] == [3, 3, 3]
    assert list(equal_steps(range(10), 2, 4)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert list(equal_steps(range(2), None, 3)) == []


def test_bound_ends_on_an_accumulation_boundary_and_counts_optimizer_steps(tmp_path):
    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=2)
    assert list(ib.bound(range(11), gradient_accumulation_steps=4)) == list(range(8))
    assert ib._budget.done == 2
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        next(ib.bound(range(4), gradient_accumulation_steps=0))


@pytest.mark.parametrize("drop_last, expected", [(True, [33, 25, 25, 25, 33]),
                                                 (False, [33, 25, 25, 25, 33])])
def test_plan_steps_counts_optimizer_steps(tmp_path, drop_last, expected):
    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=5)
    plan = ib.plan_steps(dataset_size=1000, batch_size=10, drop_last=drop_last,
                         gradient_accumulation_steps=3)
    # epochs 0 and 4: 100 batches -> 33 steps; 1-3: 750 samples estimated (P(score < mean)
    # assumed 0.5), 75 batches -> 25 steps
    assert [e.steps for e in plan.epochs] == expected
    assert plan.gradient_accumulation_steps == 3
    assert StepPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_a_step_plan_saved_before_accumulation_reads_as_one_micro_batch_per_step(tmp_path):
    plan = ibs.InfoBatch(tmp_path / "store", num_epochs=3).plan_steps(100, 10)
    old = plan.to_dict()
    del old["gradient_accumulation_steps"]
    assert StepPlan.from_dict(old) == plan and plan.gradient_accumulation_steps == 1


def test_the_budget_counts_optimizer_steps_over_a_run(tmp_path):
    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=5)
    plan = ib.plan_steps(dataset_size=1000, batch_size=10, gradient_accumulation_steps=4)
    rng = np.random.default_rng(2)
    keys = keys_of(1000)
    micro = []
    for _epoch in ib.epochs():
        batches = list(ib.bound([keys[i:i + 10] for i in range(0, 1000, 10)],
                                gradient_accumulation_steps=4))
        micro.append(len(batches))
        run_epoch(ib, keys, rng.exponential(size=1000).astype(np.float32))
    assert all(m % 4 == 0 for m in micro)
    assert ib._budget.done == sum(micro) // 4 <= plan.total_steps
    assert micro[0] == 100 and micro[1] < 100  # epoch 1 is within its budget of steps


def test_bound_refuses_an_accumulation_other_than_the_plans(tmp_path):
    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=3)
    ib.plan_steps(dataset_size=100, batch_size=10, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match=r"steps of 2 micro-batches.*got gradient_accumulation_steps=1"):
        next(ib.bound(range(10)))

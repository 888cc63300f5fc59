"""Steps: every rank takes the same number of batches, within the run's step budget.

Pruning leaves ranks with different sample counts; DDP must never wait for a rank that has
run out, so each step the ranks agree whether all still have a batch (``equal_batches``).
A step-based LR schedule is built on a total fixed before training (``plan_steps``);
``StepBudget`` keeps every epoch inside it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from ..stages.policy import PruningPolicy
from ..storage import ScoreSnapshot
from . import distributed
from .planning import StepPlan, plan_steps


def equal_batches(loader: Iterable, limit: int | None) -> Iterator[Any]:
    """The loader's batches, stopping when any rank runs out or after ``limit`` batches."""
    iterator = iter(loader)
    taken = 0
    while limit is None or taken < limit:
        try:
            batch, has_batch = next(iterator), 1
        except StopIteration:
            batch, has_batch = None, 0
        if distributed.all_min(has_batch) == 0:
            break
        taken += 1
        yield batch


class StepBudget:
    """The run's optimizer steps: the plan that fixed the total, and the steps taken so far."""

    def __init__(self) -> None:
        self.plan: StepPlan | None = None
        self.origin = 0           # steps done when the plan was made
        self.done = 0             # optimizer steps taken by bound() over the run
        self.at_epoch_start = 0

    def make_plan(self, policy: PruningPolicy, epoch: int, num_epochs: int,
                  snapshot: ScoreSnapshot, dataset_size: int, batch_size: int, world_size: int,
                  drop_last: bool, drawn: int | None = None) -> StepPlan:
        """The first call fixes the run's total; the same arguments give the same plan back."""
        plan = self.plan
        if plan is not None and (plan.dataset_size, plan.batch_size, plan.world_size,
                                 plan.drop_last, plan.drawn) == (dataset_size, batch_size,
                                                                 world_size, drop_last, drawn):
            return plan
        self.plan = plan_steps(policy, epoch, num_epochs, snapshot, dataset_size, batch_size,
                               world_size, drop_last, drawn)
        self.origin = self.done
        return self.plan

    def limit(self, policy: PruningPolicy, epoch: int, num_epochs: int,
              snapshot: ScoreSnapshot) -> int | None:
        """Steps this epoch may take: its exact count, scaled into what the budget leaves.

        Later epochs are re-estimated from the newest snapshot. When this epoch and the
        later ones need more steps than the budget has left, every one of them gives up the
        same share (the last epochs only ever take what is left), so no single epoch is cut
        short to pay for an early estimate that was too low.
        """
        plan = self.plan
        if plan is None or not plan.epochs[0].epoch <= epoch < num_epochs:
            return None
        now = plan_steps(policy, epoch, num_epochs, snapshot, plan.dataset_size,
                         plan.batch_size, plan.world_size, plan.drop_last, plan.drawn)
        left = plan.total_steps - (self.at_epoch_start - self.origin)
        needed = sum(e.steps for e in now.epochs)
        exact = now.epochs[0].steps
        if needed <= left:
            return exact
        return max(0, min(exact, left, exact * left // max(needed, 1)))

    def state_dict(self, in_epoch: bool) -> dict[str, Any]:
        """What a checkpoint keeps; mid-epoch, the steps done when the epoch started."""
        return {"steps_done": self.at_epoch_start if in_epoch else self.done,
                "plan_origin": self.origin,
                "step_plan": None if self.plan is None else self.plan.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done = self.at_epoch_start = int(state["steps_done"])
        self.origin = int(state["plan_origin"])
        plan = state.get("step_plan")
        self.plan = None if plan is None else StepPlan.from_dict(plan)

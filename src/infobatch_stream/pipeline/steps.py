"""Steps: every rank takes the same number of optimizer steps, within the run's step budget.

Pruning leaves ranks with different sample counts; DDP must never wait for a rank that has
run out, so before each optimizer step the ranks agree whether all still have its
micro-batches (``equal_steps``). A step-based LR schedule is built on a total fixed before
training (``plan_steps``); ``StepBudget`` keeps every epoch inside it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

from ..stages.policy import PruningPolicy
from ..storage import ScoreSnapshot
from . import distributed
from .planning import StepPlan, plan_steps

log = logging.getLogger(__name__)


def equal_steps(loader: Iterable, limit: int | None, accumulation: int = 1,
                group: Any = None) -> Iterator[list[Any]]:
    """The loader's micro-batches in groups of ``accumulation``, one group per optimizer step.

    Each rank fetches a whole group before the ranks agree (once per group, on ``group``,
    with CPU tensors) that every rank has one; the first rank short of a whole group ends the
    epoch on every rank, so an epoch always ends on an accumulation boundary. At most
    ``limit`` groups (None: no limit).

    >>> [len(g) for g in equal_steps(range(7), None, accumulation=3)]
    [3, 3]
    """
    iterator = iter(loader)
    taken = 0
    while limit is None or taken < limit:
        micro = list(islice(iterator, accumulation))
        if distributed.all_min(int(len(micro) == accumulation), group) == 0:
            break
        taken += 1
        yield micro


class StepBudget:
    """The run's optimizer steps: the plan that fixed the total, and the steps taken so far."""

    def __init__(self) -> None:
        self.plan: StepPlan | None = None
        self.origin = 0           # steps done when the plan was made
        self.done = 0             # optimizer steps taken by bound() over the run
        self.at_epoch_start = 0
        self.cut_steps = 0        # steps the budget took from the epoch in progress

    def check_world_size(self, world_size: int) -> None:
        """Refuse a budget planned for another number of ranks (a checkpoint resumed elsewhere):
        each rank's steps would no longer add up to the LR schedule's total."""
        if self.plan is not None and self.plan.world_size != world_size:
            raise RuntimeError(
                f"the step budget (total_steps={self.plan.total_steps}) was planned for "
                f"{self.plan.world_size} rank(s) and this run has {world_size}: its epochs would "
                f"overrun the LR schedule or be cut. Resume on {self.plan.world_size} rank(s), or "
                f"call plan_steps(..., replan=True) and build the LR schedule anew on its total")

    def make_plan(self, policy: PruningPolicy, epoch: int, num_epochs: int,
                  snapshot: ScoreSnapshot, dataset_size: int, batch_size: int, world_size: int,
                  drop_last: bool, accumulation: int = 1, drawn: int | None = None,
                  replan: bool = False) -> StepPlan:
        """The first call fixes the run's total; the same arguments give the same plan back.

        Other arguments are refused (a schedule built on the first total would overrun or end
        early) unless ``replan``: a new total for the rest of the run, from the steps done.
        """
        plan = self.plan
        asked = (dataset_size, batch_size, world_size, drop_last, accumulation, drawn)
        if plan is not None and not replan:
            fixed = (plan.dataset_size, plan.batch_size, plan.world_size, plan.drop_last,
                     plan.gradient_accumulation_steps, plan.drawn)
            if fixed == asked:
                return plan
            names = ("dataset_size", "batch_size", "world_size", "drop_last",
                     "gradient_accumulation_steps", "drawn")
            differ = ", ".join(f"{n}={a!r} (planned {f!r})"
                               for n, f, a in zip(names, fixed, asked, strict=True) if f != a)
            raise ValueError(
                f"plan_steps() was called with {differ}: the run's step budget was fixed by the "
                f"first call (total_steps={plan.total_steps}), and an LR schedule built on it "
                f"would overrun or end early. Pass the same values, or replan=True and build "
                f"the schedule anew on the new total")
        self.plan = plan_steps(policy, epoch, num_epochs, snapshot, dataset_size, batch_size,
                               world_size, drop_last, accumulation, drawn)
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
                         plan.batch_size, plan.world_size, plan.drop_last,
                         plan.gradient_accumulation_steps, plan.drawn)
        left = plan.total_steps - (self.at_epoch_start - self.origin)
        needed = sum(e.steps for e in now.epochs)
        exact = now.epochs[0].steps
        if needed <= left:
            self.cut_steps = 0
            # Resampled (``drawn``): the coming epoch's count is an expectation and its draws
            # may give it more; it may take whatever the later epochs' estimates leave.
            return exact if plan.drawn is None else left - (needed - exact)
        allowed = max(0, min(exact, left, exact * left // max(needed, 1)))
        self.cut_steps = exact - allowed
        if self.cut_steps and distributed.rank() == 0:
            warnings.warn(
                f"epoch {epoch}: the step budget (plan_steps: total {plan.total_steps}) has "
                f"{left} steps left for the {needed} that this and the later epochs need, so "
                f"this epoch takes {allowed} of its {exact} steps ({self.cut_steps} steps, "
                f"{self.cut_steps * plan.batch_size * plan.gradient_accumulation_steps} samples per "
                f"rank not trained): pruning saved "
                f"less than planned. Plan the budget after the first epoch, or use a schedule "
                f"counted in epochs", stacklevel=3)
        return allowed

    def report_end(self, num_epochs: int) -> None:
        """After the last epoch: say how far from the schedule's total the run ended."""
        plan = self.plan
        if plan is None or distributed.rank() != 0:
            return
        used = self.done - self.origin
        if used < plan.total_steps:
            log.info("the run took %d of the %d steps plan_steps() planned for its %d epochs: "
                     "pruning saved more than planned; a step-based LR schedule ends %d steps "
                     "short of its total", used, plan.total_steps, num_epochs,
                     plan.total_steps - used)

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

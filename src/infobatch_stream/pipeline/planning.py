"""Planning the run's optimizer steps, for step-based LR schedules.

The coming epoch is counted exactly (``stages.plan.plan_epoch``); later epochs are
estimates from the latest snapshot, except the annealing epochs, which train on everything
and are exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..stages.plan import EpochPlan, plan_epoch
from ..stages.policy import PruningPolicy
from ..storage import ScoreSnapshot
from ..storage.checks import check_int

# P(score < mean) assumed before any score exists (epoch 0). Losses are right-skewed, so
# more than half the samples sit below the mean; assuming exactly half underestimates what
# pruning saves. That errs on the safe side: a total the run ends a little short of costs
# the last few steps of an annealed LR schedule, while a total too small would cut epochs
# (and the samples in them) to fit.
PRIOR_BELOW_MEAN = 0.5


@dataclass(frozen=True)
class EpochSteps:
    epoch: int
    samples: int
    steps: int
    exact: bool


@dataclass(frozen=True)
class StepPlan:
    """Optimizer steps per epoch and for the run (for ``OneCycleLR(total_steps=...)``).

    ``batch_size`` is per rank and per micro-batch; an optimizer step takes
    ``gradient_accumulation_steps`` micro-batches on each rank, so an epoch of ``b``
    batches per rank has ``b // gradient_accumulation_steps`` steps (as ``bound()`` yields
    them). ``drawn``: samples an epoch draws over all ranks, for resampled shards (None: an
    epoch is one pass over ``dataset_size`` samples).

    >>> plan = plan_steps(InfoBatchPolicy(2), 0, 2, ScoreSnapshot.empty(), 1000, 10,
    ...                   gradient_accumulation_steps=4)                        # doctest: +SKIP
    >>> [e.steps for e in plan.epochs]                                          # doctest: +SKIP
    [25, 25]
    """

    dataset_size: int
    batch_size: int
    world_size: int
    drop_last: bool
    epochs: tuple[EpochSteps, ...]
    gradient_accumulation_steps: int = 1
    drawn: int | None = None

    @property
    def total_steps(self) -> int:
        return sum(e.steps for e in self.epochs)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "epochs": [asdict(e) for e in self.epochs]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepPlan:
        # A plan saved before accumulation was counted had one micro-batch per step.
        return cls(data["dataset_size"], data["batch_size"], data["world_size"], data["drop_last"],
                   tuple(EpochSteps(**e) for e in data["epochs"]),
                   data.get("gradient_accumulation_steps", 1), data.get("drawn"))


def steps_for(samples: int, batch_size: int, world_size: int, drop_last: bool,
              accumulation: int = 1) -> int:
    """Optimizer steps of an epoch of ``samples``: whole accumulation groups of batches per rank."""
    per_batch = batch_size * world_size
    batches = samples // per_batch if drop_last else -(-samples // per_batch)
    return batches // accumulation


def _saved_estimate(policy: PruningPolicy, coming: EpochPlan, snapshot: ScoreSnapshot) -> float:
    """The share of a pruning epoch's samples expected saved, for the epochs after the next."""
    if coming.rule.prunes:
        return coming.expected_saved_fraction
    if snapshot.mean is None:  # no score yet: a prior for P(score < mean)
        return policy.prune_ratio * PRIOR_BELOW_MEAN
    return 0.0  # annealing already, or a ratio of 0: nothing is pruned from here on


def plan_steps(policy: PruningPolicy, first_epoch: int, num_epochs: int, snapshot: ScoreSnapshot,
               dataset_size: int, batch_size: int, world_size: int = 1,
               drop_last: bool = True, gradient_accumulation_steps: int = 1,
               drawn: int | None = None) -> StepPlan:
    """Steps of epochs ``first_epoch .. num_epochs-1``: the first exact, the rest estimated.

    ``drawn``: resampled shards, each epoch draws this many samples over all ranks (at
    random, so a pruning epoch's count is an expectation: ``exact`` is False for it).
    """
    for name, value in (("dataset_size", dataset_size), ("batch_size", batch_size),
                        ("world_size", world_size),
                        ("gradient_accumulation_steps", gradient_accumulation_steps)):
        check_int(value, name, 1)
    if drawn is not None:
        check_int(drawn, "drawn", 1)
    k = gradient_accumulation_steps
    per_epoch = dataset_size if drawn is None else drawn
    coming = plan_epoch(policy, first_epoch, snapshot, dataset_size)
    saved_estimate = _saved_estimate(policy, coming, snapshot)
    if drawn is None:
        first, first_exact = coming.samples, True
    else:
        first, first_exact = round(coming.samples_of(drawn)), not coming.rule.prunes
    entries = [EpochSteps(first_epoch, first,
                          steps_for(first, batch_size, world_size, drop_last, k), first_exact)]
    for epoch in range(first_epoch + 1, num_epochs):
        if policy.anneals(epoch):
            samples, exact = per_epoch, True
        else:
            samples, exact = round(per_epoch * (1.0 - saved_estimate)), False
        entries.append(EpochSteps(epoch, samples, steps_for(samples, batch_size, world_size,
                                                            drop_last, k), exact))
    return StepPlan(int(dataset_size), int(batch_size), int(world_size), drop_last, tuple(entries),
                    int(k), None if drawn is None else int(drawn))

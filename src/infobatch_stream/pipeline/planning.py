"""Planning the run's optimizer steps, for step-based LR schedules.

The coming epoch is counted exactly (``stages.plan.plan_epoch``); later epochs are
estimates from the latest snapshot, except the annealing epochs, which train on everything
and are exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..stages.plan import plan_epoch
from ..stages.policy import PruningPolicy
from ..storage import ScoreSnapshot
from ..storage.checks import check_int

# P(score < mean) assumed before any score exists (epoch 0). Losses are right-skewed, so
# most samples sit below the mean (0.6 for diffusion MSE, 0.8-0.9 for cross-entropy, as
# measured in the examples); an estimate on the high side errs towards a total the run
# reaches, rather than one it ends short of.
PRIOR_BELOW_MEAN = 0.75


@dataclass(frozen=True)
class EpochSteps:
    epoch: int
    samples: int
    steps: int
    exact: bool


@dataclass(frozen=True)
class StepPlan:
    """Optimizer steps per epoch and for the run (for ``OneCycleLR(total_steps=...)``).

    ``batch_size`` is per rank; a step consumes ``batch_size * world_size`` samples.
    ``drawn``: samples an epoch draws over all ranks, for resampled shards (None: an epoch
    is one pass over ``dataset_size`` samples).
    """

    dataset_size: int
    batch_size: int
    world_size: int
    drop_last: bool
    epochs: tuple[EpochSteps, ...]
    drawn: int | None = None

    @property
    def total_steps(self) -> int:
        return sum(e.steps for e in self.epochs)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "epochs": [asdict(e) for e in self.epochs]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepPlan:
        return cls(data["dataset_size"], data["batch_size"], data["world_size"], data["drop_last"],
                   tuple(EpochSteps(**e) for e in data["epochs"]), data.get("drawn"))


def steps_for(samples: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    per_step = batch_size * world_size
    return samples // per_step if drop_last else -(-samples // per_step)


def plan_steps(policy: PruningPolicy, first_epoch: int, num_epochs: int, snapshot: ScoreSnapshot,
               dataset_size: int, batch_size: int, world_size: int = 1,
               drop_last: bool = True, drawn: int | None = None) -> StepPlan:
    """Steps of epochs ``first_epoch .. num_epochs-1``: the first exact, the rest estimated.

    ``drawn``: resampled shards, each epoch draws this many samples over all ranks (at
    random, so a pruning epoch's count is an expectation: ``exact`` is False for it).
    """
    for name, value in (("dataset_size", dataset_size), ("batch_size", batch_size),
                        ("world_size", world_size)):
        check_int(value, name, 1)
    if drawn is not None:
        check_int(drawn, "drawn", 1)
    per_epoch = dataset_size if drawn is None else drawn
    coming = plan_epoch(policy, first_epoch, snapshot, dataset_size)
    if coming.rule.prunes:
        saved_estimate = coming.expected_saved_fraction
    elif snapshot.mean is None:  # no score yet: a prior for P(score < mean)
        saved_estimate = policy.prune_ratio * PRIOR_BELOW_MEAN
    else:  # annealing already, or a ratio of 0: nothing is pruned from here on
        saved_estimate = 0.0
    if drawn is None:
        first, first_exact = coming.samples, True
    else:
        first, first_exact = round(coming.samples_of(drawn)), not coming.rule.prunes
    entries = [EpochSteps(first_epoch, first, steps_for(first, batch_size, world_size, drop_last),
                          first_exact)]
    for epoch in range(first_epoch + 1, num_epochs):
        if policy.anneals(epoch):
            samples, exact = per_epoch, True
        else:
            samples, exact = round(per_epoch * (1.0 - saved_estimate)), False
        entries.append(EpochSteps(epoch, samples, steps_for(samples, batch_size, world_size,
                                                            drop_last), exact))
    return StepPlan(int(dataset_size), int(batch_size), int(world_size), drop_last, tuple(entries),
                    None if drawn is None else int(drawn))


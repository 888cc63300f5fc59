"""Planning: how many samples and optimizer steps an epoch, and the whole run, will take.

Decisions are a pure function of the snapshot, so the coming epoch's kept count is exact:
the rule is applied to every known key of the snapshot (vectorized); keys the store has
never seen are always kept. Later epochs are estimates from the latest snapshot, except the
annealing epochs, which train on everything and are exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..stages.policy import EpochRule, PruningPolicy
from ..storage import ScoreSnapshot

# P(score < mean) assumed before any score exists (epoch 0). Losses are right-skewed, so
# most samples sit below the mean (0.6 for diffusion MSE, 0.8-0.9 for cross-entropy, as
# measured in the examples); an estimate on the high side errs towards a total the run
# reaches, rather than one it ends short of.
PRIOR_BELOW_MEAN = 0.75


@dataclass(frozen=True)
class EpochPlan:
    """What epoch ``epoch`` will train, counted from the snapshot before it starts.

    ``kept_known`` is exact; ``unseen`` needs ``dataset_size`` (None without it).
    ``expected_saved_fraction`` is the expected share of the epoch's samples pruned,
    ``r * P(score < mean)`` for InfoBatch.
    """

    epoch: int
    rule: EpochRule
    known: int
    kept_known: int
    unseen: int | None
    expected_saved_fraction: float
    annealing: bool

    @property
    def pruned(self) -> int:
        return self.known - self.kept_known

    @property
    def samples(self) -> int | None:
        """Samples the epoch will train: kept known keys + unseen keys."""
        return None if self.unseen is None else self.kept_known + self.unseen


def plan_epoch(policy: PruningPolicy, epoch: int, snapshot: ScoreSnapshot,
               dataset_size: int | None = None) -> EpochPlan:
    rule = policy.rule(epoch, snapshot)
    known = len(snapshot)
    kept_known = rule.count_kept(snapshot)
    unseen = None if dataset_size is None else max(0, int(dataset_size) - known)
    total = known + (unseen or 0)
    if rule.prunes and total:
        candidates = int(np.count_nonzero(rule.candidates_of(snapshot.scores)))
        expected = rule.drop_probability * candidates / total
    else:
        expected = 0.0
    annealing = epoch >= getattr(policy, "annealing_start", float("inf"))
    return EpochPlan(epoch, rule, known, kept_known, unseen, expected, annealing)


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
    """

    dataset_size: int
    batch_size: int
    world_size: int
    drop_last: bool
    epochs: tuple[EpochSteps, ...]

    @property
    def total_steps(self) -> int:
        return sum(e.steps for e in self.epochs)

    def steps_of(self, epoch: int) -> int:
        for entry in self.epochs:
            if entry.epoch == epoch:
                return entry.steps
        raise KeyError(f"epoch {epoch} is not in this plan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "epochs": [asdict(e) for e in self.epochs]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StepPlan":
        return cls(data["dataset_size"], data["batch_size"], data["world_size"], data["drop_last"],
                   tuple(EpochSteps(**e) for e in data["epochs"]))


def steps_for(samples: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    per_step = batch_size * world_size
    return samples // per_step if drop_last else -(-samples // per_step)


def plan_steps(policy: PruningPolicy, first_epoch: int, num_epochs: int, snapshot: ScoreSnapshot,
               dataset_size: int, batch_size: int, world_size: int = 1,
               drop_last: bool = True) -> StepPlan:
    """Steps of epochs ``first_epoch .. num_epochs-1``: the first exact, the rest estimated."""
    for name, value in (("dataset_size", dataset_size), ("batch_size", batch_size),
                        ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    coming = plan_epoch(policy, first_epoch, snapshot, dataset_size)
    if coming.rule.prunes:
        saved_estimate = coming.expected_saved_fraction
    elif snapshot.mean is None:  # no score yet: a prior for P(score < mean)
        saved_estimate = getattr(policy, "prune_ratio", 0.0) * PRIOR_BELOW_MEAN
    else:  # annealing already, or a ratio of 0: nothing is pruned from here on
        saved_estimate = 0.0
    entries = [EpochSteps(first_epoch, coming.samples,
                          steps_for(coming.samples, batch_size, world_size, drop_last), True)]
    start = getattr(policy, "annealing_start", num_epochs)
    for epoch in range(first_epoch + 1, num_epochs):
        if epoch >= start:
            samples, exact = dataset_size, True
        else:
            samples, exact = int(round(dataset_size * (1.0 - saved_estimate))), False
        entries.append(EpochSteps(epoch, samples, steps_for(samples, batch_size, world_size,
                                                            drop_last), exact))
    return StepPlan(int(dataset_size), int(batch_size), int(world_size), drop_last, tuple(entries))


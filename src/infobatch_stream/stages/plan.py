"""What one epoch will train, counted exactly from the snapshot before it starts.

Decisions are a pure function of the snapshot, so the coming epoch's kept count is exact:
the rule is applied to every known key of the snapshot (vectorized, in chunks); keys the
store has never seen are always kept. The CLI and ``InfoBatch.plan()`` both count here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..storage import ScoreSnapshot
from .policy import EpochRule, PruningPolicy


@dataclass(frozen=True)
class EpochPlan:
    """What epoch ``epoch`` will train, counted from the snapshot before it starts.

    ``kept_known`` is exact; ``unseen`` needs ``dataset_size`` (None without it).
    ``expected_saved_fraction`` is the expected share of the epoch's samples pruned,
    ``r * P(score < mean)`` for InfoBatch.

    >>> plan = plan_epoch(InfoBatchPolicy(num_epochs=10), 3, store.snapshot(2))  # doctest: +SKIP
    >>> plan.pruned, plan.kept_known                                              # doctest: +SKIP
    (3110, 6890)
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

    def samples_of(self, drawn: int) -> float:
        """Expected samples kept of ``drawn`` samples drawn at random from the dataset.

        For resampled shards (``ib.stage(epoch_samples=n)``): an epoch draws ``drawn``
        samples (n x workers x ranks), each kept with the dataset's kept share, exact from
        the snapshot (``samples`` / dataset size; without ``dataset_size``, the known keys').

        >>> ib.plan(dataset_size=50_000).samples_of(drawn=20_000)   # doctest: +SKIP
        13780.0
        """
        total = self.known + (self.unseen or 0)
        kept = self.kept_known + (self.unseen or 0)
        return float(drawn) if not total else drawn * kept / total


def plan_epoch(policy: PruningPolicy, epoch: int, snapshot: ScoreSnapshot,
               dataset_size: int | None = None) -> EpochPlan:
    """Count exactly what ``policy`` keeps of ``snapshot``'s keys in ``epoch``."""
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
    return EpochPlan(epoch, rule, known, kept_known, unseen, expected, policy.anneals(epoch))

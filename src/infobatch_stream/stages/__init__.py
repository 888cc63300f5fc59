"""webdataset stages: key -> last score -> keep/drop -> weight, and the pruning policies.

This package's face loads only numpy (the policies and epoch counting, which the CLI uses);
the stages themselves (``stages.prune``) and shard URLs (``stages.urls``) load webdataset.
"""

from .plan import EpochPlan, plan_epoch
from .policy import EpochRule, InfoBatchPolicy, PruningPolicy, RandomPolicy, annealing_start

__all__ = ["EpochPlan", "EpochRule", "InfoBatchPolicy", "PruningPolicy", "RandomPolicy",
           "annealing_start", "plan_epoch"]

"""webdataset stages: key -> last score -> keep/drop -> weight, and the pruning policies."""

from .policy import EpochRule, InfoBatchPolicy, PruningPolicy, RandomPolicy, annealing_start, uniform_draws

__all__ = ["EpochRule", "InfoBatchPolicy", "PruningPolicy", "RandomPolicy", "annealing_start",
           "uniform_draws"]

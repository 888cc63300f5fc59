"""The training side: InfoBatch (update, epochs, bound, planning, checkpoints) and the
distributed epoch boundary."""

from ..stages.plan import EpochPlan
from ..stages.urls import register_fsspec_schemes, set_shard_storage_options
from .infobatch import InfoBatch
from .planning import StepPlan

__all__ = ["EpochPlan", "InfoBatch", "StepPlan", "register_fsspec_schemes",
           "set_shard_storage_options"]

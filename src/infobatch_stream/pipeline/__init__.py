"""The training side: InfoBatch (update, epochs, bound, planning, checkpoints), distributed
commits, and fsspec shard URLs for webdataset."""

from .infobatch import InfoBatch
from .planning import EpochPlan, StepPlan
from .urls import register_fsspec_schemes, set_shard_storage_options

__all__ = ["EpochPlan", "InfoBatch", "StepPlan", "register_fsspec_schemes",
           "set_shard_storage_options"]

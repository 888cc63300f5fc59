"""infobatch-stream: InfoBatch's unbiased dynamic data pruning for webdataset pipelines.

>>> import infobatch_stream as ibs
>>> ib = ibs.InfoBatch("/tmp/scores", num_epochs=100, prune_ratio=0.5, delta=0.875)

Importing the package also lets ``wds.WebDataset`` read shard URLs of every fsspec protocol
it lacks (``s3://``, ``gcs://``, ...).
"""

from .pipeline import (
    EpochPlan, InfoBatch, StepPlan, register_fsspec_schemes, set_shard_storage_options,
)
from .pipeline.timestep import TimestepNormalizer
from .stages import EpochRule, InfoBatchPolicy, RandomPolicy, annealing_start, uniform_draws
from .stages.keyfn import sample_key, shard_key
from .stages.prune import lookup_scores, soft_prune
from .storage import (
    CorruptStoreError, NotAStoreError, OwnershipError, RetryPolicy, ScoreSnapshot, ScoreStore, StoreError,
    StoreUnavailableError, hash_key, hash_keys,
)

__version__ = "0.1.0"

register_fsspec_schemes()

__all__ = [
    "CorruptStoreError", "EpochPlan", "EpochRule", "InfoBatch", "InfoBatchPolicy",
    "NotAStoreError", "OwnershipError", "RandomPolicy", "RetryPolicy", "ScoreSnapshot", "ScoreStore", "StepPlan",
    "StoreError", "StoreUnavailableError", "TimestepNormalizer",
    "annealing_start", "hash_key", "hash_keys", "lookup_scores", "register_fsspec_schemes",
    "sample_key", "set_shard_storage_options", "shard_key", "soft_prune", "uniform_draws",
]

"""infobatch-stream: InfoBatch's unbiased dynamic data pruning for webdataset pipelines.

>>> import infobatch_stream as ibs
>>> ib = ibs.InfoBatch("/tmp/scores", num_epochs=100, prune_ratio=0.5, delta=0.875)

The package's face is lazy: ``import infobatch_stream.storage`` (what a process that only
reads or commits scores needs, and the CLI's read-only commands) loads neither torch nor
webdataset; the training side loads when one of its names is first used. Using the
training side (or ``register_fsspec_schemes()``) lets ``wds.WebDataset`` read shard URLs of
every fsspec protocol it lacks (``s3://``, ``gcs://``, ...).
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_NAMES = {
    "InfoBatch": "pipeline.infobatch", "StepPlan": "pipeline.planning",
    "TimestepNormalizer": "pipeline.timestep",
    "EpochPlan": "stages.plan", "EpochRule": "stages.policy",
    "InfoBatchPolicy": "stages.policy", "PruningPolicy": "stages.policy",
    "RandomPolicy": "stages.policy", "annealing_start": "stages.policy",
    "sample_key": "stages.keyfn", "shard_key": "stages.keyfn",
    "register_fsspec_schemes": "stages.urls", "set_shard_storage_options": "stages.urls",
    "CorruptStoreError": "storage.errors", "NotAStoreError": "storage.errors",
    "OwnershipError": "storage.errors", "StoreError": "storage.errors",
    "StoreUnavailableError": "storage.errors", "RetryPolicy": "storage.retry",
    "FencedError": "storage.errors", "SettingsMismatchError": "storage.errors",
    "StorageFullError": "storage.errors", "RunLease": "storage.runs",
    "DeltaWriter": "storage.writer", "Manifest": "storage.layout",
    "ScoreSnapshot": "storage.snapshot", "ScoreStore": "storage.store",
    "hash_key": "storage.keys", "hash_keys": "storage.keys",
    "parse_storage_options": "storage.options",
}
__all__ = [
    "CorruptStoreError", "DeltaWriter", "EpochPlan", "EpochRule", "FencedError", "InfoBatch",
    "InfoBatchPolicy", "Manifest", "NotAStoreError", "OwnershipError", "PruningPolicy",
    "RandomPolicy", "RetryPolicy", "RunLease", "ScoreSnapshot", "ScoreStore",
    "SettingsMismatchError", "StepPlan", "StorageFullError", "StoreError", "StoreUnavailableError",
    "TimestepNormalizer", "__version__", "annealing_start", "hash_key", "hash_keys",
    "parse_storage_options", "register_fsspec_schemes", "sample_key", "set_shard_storage_options",
    "shard_key",
]


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'infobatch_stream' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMES))


if "webdataset" in sys.modules:  # already paid for: keep "import it, then read s3:// shards"
    importlib.import_module(".stages.urls", __name__).register_fsspec_schemes()


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .pipeline.infobatch import InfoBatch
    from .pipeline.planning import StepPlan
    from .pipeline.timestep import TimestepNormalizer
    from .stages.keyfn import sample_key, shard_key
    from .stages.plan import EpochPlan
    from .stages.policy import EpochRule, InfoBatchPolicy, PruningPolicy, RandomPolicy, annealing_start
    from .stages.urls import register_fsspec_schemes, set_shard_storage_options
    from .storage.errors import (
        CorruptStoreError,
        FencedError,
        NotAStoreError,
        OwnershipError,
        SettingsMismatchError,
        StorageFullError,
        StoreError,
        StoreUnavailableError,
    )
    from .storage.keys import hash_key, hash_keys
    from .storage.layout import Manifest
    from .storage.options import parse_storage_options
    from .storage.retry import RetryPolicy
    from .storage.runs import RunLease
    from .storage.snapshot import ScoreSnapshot
    from .storage.store import ScoreStore
    from .storage.writer import DeltaWriter

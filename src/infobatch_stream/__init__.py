"""infobatch-stream: InfoBatch's unbiased dynamic data pruning for webdataset pipelines."""

from .storage import (
    CorruptStoreError, NotAStoreError, ScoreSnapshot, ScoreStore, StoreError, hash_key, hash_keys,
)

__version__ = "0.1.0"

__all__ = [
    "CorruptStoreError", "NotAStoreError", "ScoreSnapshot", "ScoreStore", "StoreError",
    "hash_key", "hash_keys",
]

"""The persistent score store: snapshots, deltas, commits and the per-machine cache.

Knows nothing of torch or webdataset; everything is numpy, Arrow IPC, JSON and fsspec.
"""

from .errors import (CorruptStoreError, NotAStoreError, OwnershipError, StoreError,
                     StoreUnavailableError)
from .keys import KEY_HASH_NAME, hash_key, hash_keys
from .layout import Manifest
from .retry import RetryPolicy
from .snapshot import ScoreSnapshot
from .store import ScoreStore
from .writer import DeltaWriter

__all__ = [
    "KEY_HASH_NAME", "CorruptStoreError", "DeltaWriter", "Manifest", "NotAStoreError", "OwnershipError",
    "RetryPolicy", "ScoreSnapshot", "ScoreStore", "StoreError", "StoreUnavailableError", "hash_key",
    "hash_keys",
]

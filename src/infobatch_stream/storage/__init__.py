"""The persistent score store: snapshots, deltas, commits and the per-machine cache.

Knows nothing of torch or webdataset; everything is numpy, Arrow IPC, JSON and fsspec.
Modules, from the bottom up: ``layout`` (names and manifests), ``files`` (the one owner of
file access), ``tables`` and ``snapshot`` (Arrow files), ``writer`` (deltas), ``reader``
(whole epochs), ``runs`` (owners, incarnations, fencing), ``selection``, ``merge``,
``commit`` and ``retention`` (the commit protocol), and
``store`` (``ScoreStore``, the face of all of them).
"""

from .errors import (
    CorruptStoreError,
    FencedError,
    LinkedFolderError,
    NotAStoreError,
    OwnershipError,
    RetiredEpochError,
    SettingsMismatchError,
    StorageFullError,
    StoreError,
    StoreUnavailableError,
)
from .keys import KEY_HASH_NAME, hash_key, hash_keys
from .layout import Manifest
from .options import parse_storage_options, storage_option
from .reader import StoreReader
from .retry import RetryPolicy
from .runs import RunLease
from .snapshot import ScoreSnapshot
from .store import ScoreStore
from .writer import DeltaWriter

__all__ = [
    "KEY_HASH_NAME", "CorruptStoreError", "DeltaWriter", "FencedError", "LinkedFolderError",
    "Manifest", "NotAStoreError", "OwnershipError", "RetiredEpochError", "RetryPolicy", "RunLease",
    "ScoreSnapshot", "ScoreStore", "SettingsMismatchError", "StorageFullError", "StoreError",
    "StoreReader", "StoreUnavailableError", "hash_key", "hash_keys", "parse_storage_options",
    "storage_option",
]

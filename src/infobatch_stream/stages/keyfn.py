"""Key functions: which string identifies a sample in the score store.

webdataset keys (``__key__``) are unique only within a shard. Datasets whose keys repeat
across shards use ``shard_key`` (the shard file's base name + ``/`` + ``__key__``); any
callable ``sample -> str | bytes`` works too. Two updates of one key in one epoch are
counted by the store (``inspect`` shows them): they mean keys collide.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from typing import Any

from ..storage import hash_keys

KeyFunction = Callable[[dict], "str | bytes"]


class MissingKeyError(KeyError):
    """A sample lacks the field its key is made from; names the field and the shard."""

    def __str__(self) -> str:
        return str(self.args[0])


def _missing(sample: dict, field: str) -> MissingKeyError:
    url = sample.get("__url__", "<unknown shard>")
    return MissingKeyError(
        f"sample has no {field!r} field (shard {url}); the pruning stage must come right after "
        f"the tar reader, before stages that rename or drop fields, or pass key= a function "
        f"that builds the key from the fields this sample has"
    )


def sample_key(sample: dict) -> Any:
    """The sample's ``__key__`` (the default).

    A ``None`` key counts as missing: webdataset's ``.map()`` puts ``__key__: None`` back
    into a sample whose function deleted the field.
    """
    try:
        key = sample["__key__"]
    except KeyError:
        raise _missing(sample, "__key__") from None
    if key is None:
        raise _missing(sample, "__key__")
    return key


def shard_key(sample: dict) -> str:
    """``<shard base name>/<__key__>``: unique when keys repeat across shards.

    >>> shard_key({"__key__": "000001", "__url__": "s3://b/train-0007.tar"})
    'train-0007.tar/000001'
    """
    key = sample_key(sample)
    try:
        url = sample["__url__"]
    except KeyError:
        raise _missing(sample, "__url__") from None
    return f"{posixpath.basename(url)}/{key}"


def key_hash(sample: dict, key: KeyFunction) -> int:
    """The store's hash of one sample's key; a key that cannot be hashed names its shard."""
    name = key(sample)
    try:
        return int(hash_keys([name])[0])
    except (TypeError, ValueError) as exc:
        url = sample.get("__url__", "<unknown shard>") if isinstance(sample, dict) else "?"
        raise type(exc)(f"the key of a sample of shard {url}: {exc}") from None


def resolve_key(key: str | KeyFunction | None) -> KeyFunction:
    """``None``/``"key"`` -> sample_key; ``"shard"`` -> shard_key; a callable as it is."""
    if key is None or key == "key":
        return sample_key
    if key == "shard":
        return shard_key
    if callable(key):
        return key
    raise ValueError(f"key must be 'key', 'shard' or a callable sample -> str, got {key!r}")

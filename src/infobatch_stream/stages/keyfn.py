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

import numpy as np

from ..storage import hash_keys

KeyFunction = Callable[[dict], "str | bytes"]

# A real key hash is a uniform 64-bit value: it lands in [-2**31, 2**32) (seen as int64)
# with probability 1.5 * 2**-32, so a batch of n genuine hashes is refused with probability
# (1.5 * 2**-32) ** n: about 3.5e-10 for a batch of one, never in practice for a real batch.
# Labels, class ids and dataset indices always land there.
_SMALL_LOW, _SMALL_HIGH = -(1 << 31), 1 << 32
_WHICH_FIELD = ("pass the batch's '__key__' strings (to_tuple(..., '__key__', ...)), or the "
                "stage's '__key_hash__' field (required with key='shard' or a key function)")


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


def _is_float_keys(keys: Any) -> bool:
    dtype = getattr(keys, "dtype", None)  # a torch tensor or a numpy array, on any device
    if dtype is not None:
        return bool(getattr(dtype, "is_floating_point", False)) or getattr(dtype, "kind", "") in ("f", "c")
    return isinstance(keys, (list, tuple)) and any(isinstance(k, float) for k in keys)


def check_key_hashes(hashes: np.ndarray) -> np.ndarray:
    """Refuse integer keys that cannot be key hashes (labels, indices); return ``hashes``.

    A pure function of the hashes (uint64, or their int64 bit pattern), so it can run
    wherever they land. A batch is refused only when every key fits in 32 bits.

    >>> check_key_hashes(hash_keys(["a", "b"])).shape
    (2,)
    >>> check_key_hashes(np.arange(4, dtype=np.int64))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: the keys are 4 small integers ...
    """
    if not len(hashes):
        return hashes
    signed = hashes.view(np.int64)
    if signed.min() >= _SMALL_LOW and signed.max() < _SMALL_HIGH:
        raise ValueError(
            f"the keys are {len(hashes)} small integers ({signed[:4].tolist()}...), not key "
            f"hashes: labels or indices, not the samples' keys. InfoBatch records each "
            f"sample's score by its key; {_WHICH_FIELD}")
    return hashes


def batch_key_hashes(keys: Any) -> np.ndarray:
    """The store's key hashes of a training batch's keys, refusing what cannot be keys.

    Strings are hashed; integers are the stage's ``__key_hash__`` and must look like hashes
    (``check_key_hashes``); floats are never keys. ``hash_keys`` itself still takes any
    integers as precomputed hashes.

    >>> batch_key_hashes(["00001", "00002"]).dtype
    dtype('uint64')
    """
    try:
        hashes = hash_keys(keys)
    except TypeError:  # hash_keys refuses floats; say what they probably are (checked only
        if not _is_float_keys(keys):  # here, off the per-step path of good keys)
            raise
        dtype = getattr(keys, "dtype", "float")
        raise TypeError(f"the keys are floating-point numbers ({dtype}), which are never "
                        f"sample keys (a loss or a label?); {_WHICH_FIELD}") from None
    if not (isinstance(keys, (list, tuple)) and keys and isinstance(keys[0], (str, bytes))):
        check_key_hashes(hashes)  # strings hash uniformly: only integers need the check
    return hashes

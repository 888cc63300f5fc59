"""Sample keys -> 64-bit key hashes, and score arrays -> float32.

The key hash is persisted, so it is fixed: ``xxh3_64`` (seed 0) of the key's UTF-8 bytes,
as an unsigned 64-bit integer. ``hash_keys(["a"])[0] == xxhash.xxh3_64_intdigest(b"a")``.

Accepted keys:

- ``str`` (hashed from its UTF-8 encoding), ``bytes``/``bytearray``/``memoryview``;
- integers, numpy integer arrays and torch integer tensors are *precomputed hashes*, taken
  as they are (a signed value is read as its two's-complement bit pattern, so a hash that
  travelled through an ``int64`` tensor comes back unchanged).

This module knows nothing of torch: tensors are recognised by their ``detach`` method.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xxhash

KEY_HASH_NAME = "xxh3_64(utf-8 key), seed 0"

_xxh3 = xxhash.xxh3_64_intdigest
_U64 = 1 << 64


def hash_key(key: str | bytes) -> int:
    """Hash one key string the way the store does.

    >>> hash_key("00042") == xxhash.xxh3_64_intdigest(b"00042")
    True
    """
    return int(hash_keys([key])[0])


def _to_numpy(values: Any) -> Any:
    """A torch tensor (any device, any dtype numpy can hold) -> numpy; anything else unchanged."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):
        tensor = values.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype.itemsize < 4:
            tensor = tensor.float()  # numpy has no bfloat16; fp16 is widened too, exactly
        return tensor.numpy()
    return values


def hash_keys(keys: Any) -> np.ndarray:
    """Key hashes (uint64, one per key) of a sequence of keys.

    >>> hash_keys(["a", b"a", np.uint64(7)]).tolist()[1:] == [xxhash.xxh3_64_intdigest(b"a"), 7]
    True
    """
    keys = _to_numpy(keys)
    if isinstance(keys, (str, bytes, bytearray)):
        raise TypeError(
            f"keys must be a sequence of keys, got a single {type(keys).__name__}; "
            f"wrap it in a list: [{keys!r}]"
        )
    if isinstance(keys, np.ndarray):
        if keys.ndim != 1:
            raise ValueError(f"keys must be one-dimensional, got an array of shape {keys.shape}")
        if keys.dtype == np.uint64:
            return keys
        if keys.dtype.kind == "i":
            return keys.astype(np.int64, copy=False).view(np.uint64)
        if keys.dtype.kind == "u":
            return keys.astype(np.uint64)
        if keys.dtype.kind in "USO":
            keys = keys.tolist()
        else:
            raise TypeError(
                f"keys of numpy dtype {keys.dtype} are not accepted: pass key strings, bytes, "
                f"or precomputed uint64 hashes"
            )
    try:
        # The common case, a list of str from a collated batch: one C-level call per key.
        # ``map`` keeps the loop in C (about twice as fast as a generator expression); a
        # key that is not a str makes ``str.encode`` raise TypeError -> the mixed path.
        return np.fromiter(map(_xxh3, map(str.encode, keys)), np.uint64, len(keys))
    except (AttributeError, TypeError, UnicodeEncodeError):
        return _hash_mixed(keys)


def _hash_mixed(keys: Any) -> np.ndarray:
    try:
        items = list(keys)
    except TypeError:
        raise TypeError(
            f"keys must be a sequence of str, bytes or integer hashes, got {type(keys).__name__}"
        ) from None
    out = np.empty(len(items), np.uint64)
    for i, key in enumerate(items):
        if isinstance(key, str):
            try:
                out[i] = _xxh3(key.encode())
            except UnicodeEncodeError as exc:
                raise ValueError(f"key #{i} ({key!r}) is not valid unicode: {exc}") from None
        elif isinstance(key, (bytes, bytearray, memoryview)):
            out[i] = _xxh3(bytes(key))
        elif isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
            value = int(key)
            if not -(1 << 63) <= value < _U64:
                raise ValueError(f"key #{i} ({value}) does not fit in 64 bits")
            out[i] = value % _U64
        else:
            raise TypeError(
                f"key #{i} has type {type(key).__name__}; keys must be str, bytes or integer "
                f"hashes (e.g. the batch's '__key__' strings)"
            )
    return out


def as_scores(scores: Any, expected: int) -> np.ndarray:
    """Scores as a 1-D float32 array of ``expected`` values (torch, numpy or a list)."""
    scores = _to_numpy(scores)
    array = np.asarray(scores)
    if array.dtype.kind not in "fiub":
        raise TypeError(f"scores must be numbers, got dtype {array.dtype}")
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, and is then rejected
        array = array.astype(np.float32, copy=False).reshape(-1)
    if array.shape[0] != expected:
        raise ValueError(f"got {expected} keys but {array.shape[0]} scores; pass one score per key")
    return array

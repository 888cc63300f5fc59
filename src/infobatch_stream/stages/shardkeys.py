"""The key strings of webdataset shards, read from the tar member names alone.

The store keeps only 64-bit key hashes. To join scores back to samples (``infobatch-stream
export --shards``), the keys are read from the shards with webdataset's own rules: its tar
reader's (regular files, ``__meta__`` members skipped) and its grouping (the key is the
member name up to the first dot of the base name, ``base_plus_ext``). Payloads are never
read into memory: the tar stream skips over them.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import Any

import fsspec
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from .keyfn import shard_key

KEY_KINDS = ("key", "shard")


def member_keys(url: str, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
    """The ``__key__`` of each sample of one shard, in order (local path or fsspec URL).

    >>> list(member_keys("train-000000.tar"))[:2]   # doctest: +SKIP
    ['00000', '00001']
    """
    names: list[str] = []

    def collect(name: str) -> bool:
        names.append(name)
        return False  # never read the payload

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    last = None
    with fs.open(path, "rb") as stream:
        for _ in tar_file_iterator(stream, select_files=collect):
            pass  # select_files said no to every member: nothing is yielded
        for name in names:
            key = base_plus_ext(name)[0]
            if key is not None and key != last:
                yield key
                last = key


def shard_key_strings(patterns: list[str], key: str = "key",
                      storage_options: dict[str, Any] | None = None) -> list[str]:
    """Every sample's key string in the shards ``patterns`` name, as the stage builds it.

    ``key``: ``"key"`` (``__key__``, the default key) or ``"shard"`` (``shard_key``: shard
    base name + ``/`` + ``__key__``). Brace patterns are expanded as webdataset does.

    >>> shard_key_strings(["train-{000000..000001}.tar"], key="shard")[:1]   # doctest: +SKIP
    ['train-000000.tar/00000']
    """
    if key not in KEY_KINDS:
        raise ValueError(f"key must be one of {KEY_KINDS}, got {key!r}")
    out: list[str] = []
    for pattern in patterns:
        for url in expand_urls(pattern):
            try:
                keys = list(member_keys(url, storage_options))
            except FileNotFoundError:
                raise FileNotFoundError(f"shard {url} does not exist (check the URL)") from None
            except tarfile.TarError as exc:
                raise ValueError(f"shard {url} is not a readable tar file ({exc})") from None
            if key == "shard":
                keys = [shard_key({"__key__": k, "__url__": url}) for k in keys]
            out += keys
    return out

"""Shard URLs on any fsspec filesystem (``s3://``, ``gcs://``, ``abfs://``...) for webdataset.

webdataset 1.0 opens URLs through its ``gopen_schemes`` table and has no ``s3://`` entry.
``register_fsspec_schemes()`` (run by ``import infobatch_stream``) adds one entry per
protocol fsspec knows and webdataset lacks; the schemes webdataset has keep its own openers.
Credentials and endpoints come where fsspec takes them from: the usual AWS variables
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...), fsspec's config, or
``set_shard_storage_options``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import fsspec
import fsspec.config
from webdataset.gopen import gopen_schemes

_BLOCK_SIZE = 8 << 20  # tar shards are read front to back: large sequential reads


def _fsspec_opener(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any):
    if mode != "rb":
        raise ValueError(f"{url}: shards are opened for reading only (mode {mode!r})")
    # ``fsspec.open(url, block_size=...)`` would hand block_size to the filesystem's
    # constructor (s3fs passes it on to its botocore session, which rejects it): it is an
    # option of ``fs.open``. ``url_to_fs`` still applies fsspec's config (endpoints, keys).
    fs, path = fsspec.core.url_to_fs(url)
    try:
        return fs.open(path, "rb", block_size=_BLOCK_SIZE)
    except FileNotFoundError:
        raise FileNotFoundError(f"shard {url} does not exist (check the URL and the bucket)") from None


def register_fsspec_schemes() -> list[str]:
    """Let ``wds.WebDataset`` read every fsspec protocol it lacks; returns the ones added."""
    added = []
    for protocol in fsspec.available_protocols():
        if protocol in ("file", "local") or protocol in gopen_schemes:
            continue
        gopen_schemes[protocol] = _fsspec_opener
        added.append(protocol)
    return added


def set_shard_storage_options(protocol: str, **options: Any) -> None:
    """Default fsspec options for shard URLs of ``protocol`` (e.g. an S3 endpoint).

    Also exported as ``FSSPEC_<PROTOCOL>`` so DataLoader workers started with the ``spawn``
    method see them too.

    >>> set_shard_storage_options("s3", endpoint_url="http://127.0.0.1:9000")
    """
    fsspec.config.conf.setdefault(protocol, {}).update(options)
    variable = f"FSSPEC_{protocol.upper()}"
    merged = json.loads(os.environ.get(variable, "{}"))
    merged.update(options)
    os.environ[variable] = json.dumps(merged)

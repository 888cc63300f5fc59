"""fsspec storage options from the command line: ``--storage-option KEY=VALUE``.

The CLI and the examples take the options of a store or shard URL the same way: each
VALUE is read as JSON when it parses, so ``anon=true`` and ``max_attempts=5`` are typed,
and kept as a string otherwise.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from typing import Any


def storage_option(text: str) -> tuple[str, Any]:
    """argparse ``type=`` for one ``KEY=VALUE``; VALUE read as JSON when it parses.

    >>> storage_option("endpoint_url=http://127.0.0.1:9000"), storage_option("anon=true")
    (('endpoint_url', 'http://127.0.0.1:9000'), ('anon', True))
    """
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def parse_storage_options(items: Iterable[str | tuple[str, Any]]) -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` (or pairs ``storage_option`` made) -> a dict for fsspec.

    >>> parse_storage_options(["endpoint_url=http://minio:9000", "anon=false"])
    {'endpoint_url': 'http://minio:9000', 'anon': False}
    """
    pairs = (storage_option(item) if isinstance(item, str) else item for item in items)
    return dict(pairs)


def add_storage_option_argument(parser: argparse.ArgumentParser, help_suffix: str = "") -> None:
    """``--storage-option KEY=VALUE`` (repeatable) on ``parser``, collected as pairs in
    ``args.storage_options``."""
    parser.add_argument(
        "--storage-option", metavar="KEY=VALUE", type=storage_option, action="append",
        default=[], dest="storage_options",
        help="an fsspec option, repeatable; VALUE is read as JSON when it parses (numbers, "
             "true/false; quote a numeric string: key='\"123\"'), e.g. "
             "endpoint_url=http://127.0.0.1:9000" + help_suffix)

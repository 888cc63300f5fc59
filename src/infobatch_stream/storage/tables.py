"""The two Arrow IPC file kinds the store writes: snapshots and deltas.

Both are uncompressed Arrow IPC files holding one record batch sorted by key hash, so a
reader memory-maps them and takes numpy views without a copy. Each file carries its own
description in the schema metadata (key ``infobatch_stream``, JSON) including an xxh3
checksum of its column data: a damaged file is refused, never read as wrong scores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import xxhash

META_KEY = b"infobatch_stream"

SNAPSHOT_SCHEMA = pa.schema(
    [("hash", pa.uint64()), ("score", pa.float32()), ("epoch", pa.uint32())]
)
DELTA_SCHEMA = pa.schema([("hash", pa.uint64()), ("score", pa.float32())])


def columns_digest(columns: list[np.ndarray]) -> str:
    digest = xxhash.xxh3_64()
    for column in columns:
        digest.update(memoryview(np.ascontiguousarray(column)).cast("B"))
    return digest.hexdigest()


def file_digest(path: str) -> str:
    """xxh3_64 of a whole local file, read through a memory map (no copy)."""
    with pa.memory_map(path, "r") as source:
        return xxhash.xxh3_64(memoryview(source.read_buffer())).hexdigest()


def write_table_file(sink: Any, schema: pa.Schema, columns: list[np.ndarray],
                     meta: dict[str, Any]) -> str:
    """Write ``columns`` (numpy, one per schema field) as one record batch, without copying them.

    Returns the checksum of the column data, which the file's metadata also holds.
    """
    rows = len(columns[0])
    meta = dict(meta, rows=rows, digest=columns_digest(columns))
    arrays = [
        pa.Array.from_buffers(field.type, rows, [None, pa.py_buffer(np.ascontiguousarray(col))])
        for field, col in zip(schema, columns)
    ]
    schema = schema.with_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    with pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
    return meta["digest"]


@dataclass
class TableFile:
    """A memory-mapped table file: numpy views of its columns and its metadata."""

    columns: dict[str, np.ndarray]
    meta: dict[str, Any]
    batch: pa.RecordBatch


def open_table_file(path: str, schema: pa.Schema, kind: str) -> TableFile:
    """Map and check a table file; ValueError says what is wrong with it."""
    try:
        source = pa.memory_map(path, "r")
        reader = pa.ipc.open_file(source)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise ValueError(f"not a readable Arrow IPC file ({exc})") from None
    file_schema = reader.schema
    if file_schema.remove_metadata() != schema:
        raise ValueError(f"schema is [{file_schema.remove_metadata()}], expected [{schema}]")
    try:
        meta = json.loads((file_schema.metadata or {})[META_KEY])
    except (KeyError, ValueError):
        raise ValueError("has no infobatch_stream metadata") from None
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        raise ValueError(f"is not a {kind} file")
    if reader.num_record_batches != 1:
        raise ValueError(f"holds {reader.num_record_batches} record batches, expected 1")
    try:
        batch = reader.get_batch(0)
        batch.validate()
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise ValueError(f"is truncated or damaged ({exc})") from None
    if batch.num_rows != meta.get("rows"):
        raise ValueError(f"holds {batch.num_rows} rows, its metadata says {meta.get('rows')}")
    columns = {
        name: batch.column(i).to_numpy(zero_copy_only=True) for i, name in enumerate(schema.names)
    }
    if columns_digest(list(columns.values())) != meta.get("digest"):
        raise ValueError("column data does not match its checksum (the file is damaged)")
    return TableFile(columns=columns, meta=meta, batch=batch)

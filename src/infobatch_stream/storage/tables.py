"""The two Arrow IPC file kinds the store writes: snapshots and deltas.

Both are uncompressed Arrow IPC files holding one record batch sorted by key hash, so a
reader memory-maps them and takes numpy views without a copy. Each file carries its own
description in the schema metadata (key ``infobatch_stream``, JSON) including an xxh3
checksum of its column data: a damaged file is refused, never read as wrong scores.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import xxhash

META_KEY = b"infobatch_stream"

SNAPSHOT_SCHEMA = pa.schema(
    [("hash", pa.uint64()), ("score", pa.float32()), ("epoch", pa.uint32())]
)
DELTA_SCHEMA = pa.schema([("hash", pa.uint64()), ("score", pa.float32())])

_MAP_WINDOW = 4 << 20  # what a checksum pass maps at a time


def columns_digest(columns: list[np.ndarray]) -> str:
    digest = xxhash.xxh3_64()
    for column in columns:
        digest.update(memoryview(np.ascontiguousarray(column)).cast("B"))
    return digest.hexdigest()


def write_table_file(sink: Any, schema: pa.Schema, columns: list[np.ndarray],
                     meta: dict[str, Any]) -> str:
    """Write ``columns`` (numpy, one per schema field) as one record batch, without copying them.

    Returns the checksum of the column data, which the file's metadata also holds.
    """
    rows = len(columns[0])
    meta = dict(meta, rows=rows, digest=columns_digest(columns))
    arrays = [
        pa.Array.from_buffers(field.type, rows, [None, pa.py_buffer(np.ascontiguousarray(col))])
        for field, col in zip(schema, columns, strict=True)
    ]
    schema = schema.with_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    with pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
    return meta["digest"]


@dataclass
class TableFile:
    """A memory-mapped table file: numpy views of its columns and its metadata.

    ``offsets`` holds where each column's data starts in the file, so that a pass over a whole
    file (a checksum, a commit's merge) can read it with ``read_rows`` instead of touching the
    mapping: read pages are not kept resident in the process, mapped ones are.
    """

    columns: dict[str, np.ndarray]
    meta: dict[str, Any]
    batch: pa.RecordBatch
    path: str | None = None
    offsets: dict[str, int] = field(default_factory=dict)

    def read_rows(self, fd: int, name: str, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` of a column as a private array, read from ``fd`` (this file, opened)."""
        column = self.columns[name]
        out = np.empty(max(hi - lo, 0), column.dtype)
        _pread_into(fd, memoryview(out).cast("B"), self.offsets[name] + lo * column.itemsize)
        return out


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        got = os.preadv(fd, [view], offset)
        if got <= 0:
            raise ValueError("is shorter than its own metadata says (truncated)")
        view, offset = view[got:], offset + got


def _file_columns_digest(path: str, spans: list[tuple[int, int]]) -> str:
    """``columns_digest`` of columns stored at (offset, nbytes) in ``path``.

    Read through short-lived windows of a memory map: the pages are shared page cache while
    a window is mapped and leave the process when it is unmapped, so neither a commit (which
    checks every input) nor a DataLoader worker (which checks the snapshot it opens) keeps a
    copy of the file or a large read buffer in its private memory.
    """
    digest = xxhash.xxh3_64()
    grain = mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        for offset, nbytes in spans:
            if offset + nbytes > size:
                raise ValueError("is shorter than its own metadata says (truncated)")
            while nbytes:
                start = offset - offset % grain
                length = min(nbytes + offset - start, _MAP_WINDOW)
                with mmap.mmap(handle.fileno(), length, offset=start,
                               access=mmap.ACCESS_READ) as window, \
                        memoryview(window)[offset - start:] as part:
                    digest.update(part)
                    done = len(part)
                offset, nbytes = offset + done, nbytes - done
    return digest.hexdigest()


def open_table_file(path: str, schema: pa.Schema, kind: str) -> TableFile:
    """Map and check a table file; ValueError says what is wrong with it."""
    try:
        source = pa.memory_map(path, "r")
        reader = pa.ipc.open_file(source)
    except FileNotFoundError:
        raise  # gone (retention removed it meanwhile), not damaged: the caller decides
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
    # Where each column lies in the file: its address in the mapping minus the file's.
    source.seek(0)
    base = source.read_buffer(1).address if batch.num_rows else 0  # zero-copy: the mapping
    offsets = {name: col.ctypes.data - base for name, col in columns.items() if len(col)}
    # Checked through windows of their own, not through the table's mapping, which would keep
    # every page of every input of a commit resident in the committing process.
    digest = _file_columns_digest(path, [(offsets[name], col.nbytes)
                                         for name, col in columns.items() if len(col)])
    if digest != meta.get("digest"):
        raise ValueError("column data does not match its checksum (the file is damaged)")
    return TableFile(columns=columns, meta=meta, batch=batch, path=path, offsets=offsets)

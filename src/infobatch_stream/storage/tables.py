"""The two Arrow IPC file kinds the store writes: snapshots and deltas.

Both are uncompressed Arrow IPC files holding one record batch sorted by key hash, so a
reader memory-maps them and takes numpy views without a copy. Each file carries its own
description in the schema metadata (key ``infobatch_stream``, JSON) including an xxh3
checksum of its column data: a damaged file is refused, never read as wrong scores.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import xxhash

from .layout import strict_json

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
    score_sum: float = 0.0  # float64 sum of the score column, found by the check

    def score_magnitude(self, rows_per_read: int = 1 << 20) -> float:
        """The float64 sum of the scores' absolute values, read from the file in chunks (the
        scale of a sum's rounding error; asked only when a sum looks off)."""
        total, count = 0.0, len(self.columns["score"])
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for lo in range(0, count, rows_per_read):
                chunk = self.read_rows(fd, "score", lo, min(count, lo + rows_per_read))
                total += float(np.add.reduce(np.abs(chunk), dtype=np.float64))
        finally:
            os.close(fd)
        return total

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


class _ColumnCheck:
    """What a column must hold beyond its checksum, checked window by window in the checksum's
    own pass: key hashes strictly increasing (sorted, unique: lookups and merges bisect them),
    scores finite (their float64 sums kept for the snapshot's stored sum), and no epoch past
    ``max_epoch``. A problem is returned, not raised: the window's buffer must be released."""

    def __init__(self, name: str, dtype: np.dtype, max_epoch: int | None):
        self.name = name
        self.dtype = np.dtype(dtype)
        self.max_epoch = max_epoch
        self.last: int | None = None
        self.total = 0.0

    def __call__(self, raw: memoryview) -> str | None:
        values = np.frombuffer(raw, self.dtype)
        if not len(values):
            return None
        if self.name == "hash":
            if (self.last is not None and values[0] <= self.last) or not (values[1:] > values[:-1]).all():
                return "key hashes are not sorted and unique"
            self.last = int(values[-1])
        elif self.name == "score":
            total = float(np.add.reduce(values, dtype=np.float64))
            if not math.isfinite(total):  # a NaN or inf makes the sum so; finite floats cannot
                return "holds NaN or infinite scores"
            self.total += total
        elif self.name == "epoch" and self.max_epoch is not None and int(values.max()) > self.max_epoch:
            return f"holds scores of epoch {int(values.max())}, after its own epoch {self.max_epoch}"
        return None


def _file_columns_digest(path: str, spans: list[tuple[int, int, _ColumnCheck]]) -> str:
    """``columns_digest`` of columns stored at (offset, nbytes) in ``path``, each column checked.

    Read through short-lived windows of a memory map: the pages are shared page cache while
    a window is mapped and leave the process when it is unmapped, so neither a commit (which
    checks every input) nor a DataLoader worker (which checks the snapshot it opens) keeps a
    copy of the file or a large read buffer in its private memory.
    """
    digest = xxhash.xxh3_64()
    grain = mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        for offset, nbytes, check in spans:
            if offset + nbytes > size:
                raise ValueError("is shorter than its own metadata says (truncated)")
            while nbytes:
                start = offset - offset % grain
                take = min(nbytes, _MAP_WINDOW - (offset - start))
                take -= take % check.dtype.itemsize if take < nbytes else 0  # whole values
                with mmap.mmap(handle.fileno(), offset - start + take, offset=start,
                               access=mmap.ACCESS_READ) as window, \
                        memoryview(window)[offset - start:] as part:
                    digest.update(part)
                    problem = check(part)
                if problem:
                    raise ValueError(problem)
                offset, nbytes = offset + take, nbytes - take
    return digest.hexdigest()


def read_table_meta(path: str) -> dict[str, Any]:
    """A table file's metadata alone (nothing checked but that it parses); ValueError if not."""
    try:
        with pa.memory_map(path, "r") as source:
            metadata = pa.ipc.open_file(source).schema.metadata or {}
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"not a readable Arrow IPC file ({exc})") from None
    meta = strict_json(metadata.get(META_KEY, b"null"))
    if not isinstance(meta, dict):
        raise ValueError("has no infobatch_stream metadata")
    return meta


def open_table_file(path: str, schema: pa.Schema, kind: str, *,
                    max_epoch: int | None = None) -> TableFile:
    """Map and check a table file; ValueError says what is wrong with it.

    Checked: the schema, strict-JSON metadata of the right kind with its row count, the
    column checksum, sorted unique key hashes, finite scores and (``max_epoch``) no row
    updated after the file's epoch. ``TableFile.score_sum`` is the scores' float64 sum.
    """
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
        meta = strict_json((file_schema.metadata or {})[META_KEY])
    except KeyError:
        raise ValueError("has no infobatch_stream metadata") from None
    except ValueError as exc:
        raise ValueError(f"has unreadable infobatch_stream metadata: {exc}") from None
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        raise ValueError(f"is not a {kind} file")
    if reader.num_record_batches != 1:
        raise ValueError(f"holds {reader.num_record_batches} record batches, expected 1")
    try:
        batch = reader.get_batch(0)
        batch.validate()
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise ValueError(f"is truncated or damaged ({exc})") from None
    rows = meta.get("rows")
    if isinstance(rows, bool) or not isinstance(rows, int) or batch.num_rows != rows:
        raise ValueError(f"holds {batch.num_rows} rows, its metadata says {rows!r}")
    columns = {
        name: batch.column(i).to_numpy(zero_copy_only=True) for i, name in enumerate(schema.names)
    }
    # Where each column lies in the file: its address in the mapping minus the file's.
    source.seek(0)
    base = source.read_buffer(1).address if batch.num_rows else 0  # zero-copy: the mapping
    offsets = {name: col.ctypes.data - base for name, col in columns.items() if len(col)}
    # Checked through windows of their own, not through the table's mapping, which would keep
    # every page of every input of a commit resident in the committing process.
    checks = {name: _ColumnCheck(name, col.dtype, max_epoch) for name, col in columns.items()}
    digest = _file_columns_digest(path, [(offsets[name], col.nbytes, checks[name])
                                         for name, col in columns.items() if len(col)])
    if digest != meta.get("digest"):
        raise ValueError("column data does not match its checksum (the file is damaged)")
    return TableFile(columns=columns, meta=meta, batch=batch, path=path, offsets=offsets,
                     score_sum=checks["score"].total)

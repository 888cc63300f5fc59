"""Files that are well formed but wrong, their checksums valid: unsorted or repeated key
hashes, NaN/inf scores, rows of a later epoch, metadata that disagrees with the data,
negative or non-integer counters, JSON nested past the parser's stack, manifest names that
only look like manifests, a directory where a manifest should be. Each is a CorruptStoreError
naming the file and the last good epoch: never a wrong score, never a raw RecursionError,
ValueError or IsADirectoryError. A commit checks every delta it merges, so one bad delta
fails it, named, with the store unchanged: never a manifest the store's own reader refuses."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest

from infobatch_stream.storage import layout
from infobatch_stream.storage.tables import (
    DELTA_SCHEMA,
    META_KEY,
    SNAPSHOT_SCHEMA,
    columns_digest,
    write_table_file,
)

from .conftest import Backend
from .test_errors import (
    EPOCH0,
    A,
    _edit_manifest,
    assert_corrupt,
    assert_epoch0_intact,
    cases,
    epoch1_of_two_ranks,
    two_epochs,
)

DEEP = b"[" * 100_000 + b"]" * 100_000  # deeper than Python's parser can go


def _columns(raw: bytes, names: list[str]) -> tuple[list[np.ndarray], dict]:
    reader = pa.ipc.open_file(pa.BufferReader(raw))
    batch = reader.get_batch(0)
    meta = json.loads(reader.schema.metadata[META_KEY])
    return [batch.column(i).to_numpy().copy() for i in range(len(names))], meta


def _table_bytes(schema: pa.Schema, columns: list[np.ndarray], meta: dict,
                 raw_meta: bytes | None = None) -> tuple[bytes, str]:
    """A table file with a valid checksum; ``raw_meta`` replaces the metadata's JSON text."""
    sink = io.BytesIO()
    meta = {k: v for k, v in meta.items() if k not in ("rows", "digest")}
    digest = write_table_file(sink, schema, columns, meta)
    if raw_meta is None:
        return sink.getvalue(), digest
    arrays = [pa.array(c) for c in columns]
    with_meta = schema.with_metadata({META_KEY: raw_meta})
    out = io.BytesIO()
    with pa.ipc.new_file(out, with_meta) as writer:
        writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=with_meta))
    return out.getvalue(), columns_digest(columns)


def _sorted_by_hash(columns: list[np.ndarray]) -> list[np.ndarray]:
    order = np.argsort(columns[0])
    return [c[order] for c in columns]


def _edit_snapshot(cols: list[np.ndarray], meta: dict, edit: str) -> tuple[list, dict, bytes | None]:
    hashes, scores, epochs = cols
    if edit == "unsorted":
        hashes[[0, 1]], scores[[0, 1]], epochs[[0, 1]] = hashes[[1, 0]], scores[[1, 0]], epochs[[1, 0]]
    elif edit == "repeated-hash":
        hashes[1] = hashes[0]
    elif edit in ("nan", "inf"):
        scores[0] = np.nan if edit == "nan" else np.inf
    elif edit == "later-epoch":
        epochs[0] = 7
    elif edit == "sum":  # scores changed, the stored sum and mean (and the manifest's) not
        scores[0] += 100.0
    elif edit == "deep-metadata":
        return cols, meta, b'{"kind": "snapshot", "x": ' + DEEP + b"}"
    return cols, meta, None


@cases("edit, problem", {
    "unsorted": ("unsorted", "not sorted and unique"),
    "repeated-hash": ("repeated-hash", "not sorted and unique"),
    "nan": ("nan", "NaN or infinite"),
    "inf": ("inf", "NaN or infinite"),
    "later-epoch": ("later-epoch", "after its own epoch 1"),
    "sum": ("sum", "sum to"),
    "deep-metadata": ("deep-metadata", "nested too deeply"),
}, s3=("unsorted", "nan"))
def test_a_snapshot_with_a_valid_checksum_but_wrong_content(backend: Backend, edit: str,
                                                            problem: str) -> None:
    """Rewritten with a correct checksum, size and mean in its manifest: the checksum alone
    would pass it, and a lookup would bisect unsorted hashes or return NaN as a score."""
    store = two_epochs(backend)
    relpath = store.manifest(1).snapshot
    cols, meta = _columns(backend.read(relpath), ["hash", "score", "epoch"])
    cols, meta, raw_meta = _edit_snapshot(cols, meta, edit)
    data, digest = _table_bytes(SNAPSHOT_SCHEMA, cols, meta, raw_meta)
    backend.write(relpath, data)
    _edit_manifest(backend, 1, snapshot_bytes=len(data), snapshot_xxh3=digest)
    assert_corrupt(lambda: backend.open().snapshot(), backend, relpath, 0, problem)
    assert_corrupt(lambda: backend.open().commit(2), backend, relpath, 0, problem)  # never built on
    assert_epoch0_intact(backend)


def _edit_delta(cols: list[np.ndarray], meta: dict, edit: str) -> tuple[list, dict, bytes | None]:
    if edit == "unsorted":
        cols = [c[::-1].copy() for c in _sorted_by_hash(cols)]
    elif edit == "nan":
        cols[1][0] = np.nan
    elif edit == "negative-duplicates":
        meta["duplicates"] = -5
    elif edit == "fractional-rejected":
        meta["rejected_nonfinite"] = 1.5
    elif edit == "string-duplicates":
        meta["duplicates"] = "3"
    elif edit == "true-duplicates":
        meta["duplicates"] = True
    elif edit == "other-incarnation":
        meta["incarnation"] = 9
    elif edit == "deep-metadata":
        return cols, meta, b'{"kind": "delta", "epoch": 1, "x": ' + DEEP + b"}"
    elif edit == "fractional-rows":  # 2.0 == 2 in Python: it passed the row count check
        raw = dict(meta, rows=float(len(cols[0])), digest=columns_digest(cols))
        return cols, meta, json.dumps(raw).encode()
    return cols, meta, None


@cases("edit, problem", {
    "unsorted": ("unsorted", "not sorted and unique"),
    "nan": ("nan", "NaN or infinite"),
    "negative-duplicates": ("negative-duplicates", "'duplicates' must be a non-negative integer"),
    "fractional-rejected": ("fractional-rejected", "'rejected_nonfinite' must be a non-negative"),
    "string-duplicates": ("string-duplicates", "'duplicates' must be"),
    "true-duplicates": ("true-duplicates", "'duplicates' must be"),
    "other-incarnation": ("other-incarnation", "holds incarnation 9, its name says 0"),
    "deep-metadata": ("deep-metadata", "nested too deeply"),
    "fractional-rows": ("fractional-rows", "its metadata says 2.0"),
}, s3=("negative-duplicates", "unsorted"))
def test_a_delta_with_a_valid_checksum_but_wrong_content_fails_the_commit(
        backend: Backend, edit: str, problem: str) -> None:
    """The commit names the delta and changes nothing (a negative duplicate count used to be
    summed into a manifest that the store's own reader then refused: a bricked store)."""
    _, relpath = epoch1_of_two_ranks(backend, ["b", "c"], [20.0, 30.0])
    cols, meta = _columns(backend.read(relpath), ["hash", "score"])
    cols, meta, raw_meta = _edit_delta(cols, meta, edit)
    backend.write(relpath, _table_bytes(DELTA_SCHEMA, cols, meta, raw_meta)[0])
    before = backend.files()
    assert_corrupt(lambda: backend.open().commit(1), backend, relpath, 0, problem)
    assert backend.files() == before
    assert_epoch0_intact(backend)
    backend.remove(relpath)  # once the bad file is dealt with, the store goes on
    backend.open().commit(1)
    assert backend.open().snapshot(1).lookup(A).tolist() == [10.0, 2.0, 3.0]


@cases("name", {
    "trailing-newline": "epoch-00000002.json\n",
    "arabic-indic-digits": "epoch-\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0662.json",
    "spaces": " epoch-00000002.json",
}, s3=("arabic-indic-digits",))
def test_a_file_named_almost_like_a_manifest(backend: Backend, name: str) -> None:
    """``re.match`` with ``$`` let a trailing newline through, ``\\d`` Arabic-Indic digits, and
    ``int()`` read those as epoch 2: the reader then looked for a manifest that is not there."""
    two_epochs(backend)
    relpath = f"{layout.MANIFESTS}/{name}"
    backend.write(relpath, backend.read(layout.manifest_name(1)).replace(b'"epoch": 1', b'"epoch": 2'))
    fresh = backend.open()
    for use in (lambda: fresh.latest_epoch, lambda: fresh.snapshot(), lambda: fresh.commit(2)):
        err = assert_corrupt(use, backend, relpath, 1, "is not a manifest name the store writes")
        assert repr(name) in str(err)
    backend.remove(relpath)
    assert backend.open().latest_epoch == 1


@cases("where", {"directory": "directory"}, s3=("directory",))
def test_a_directory_where_a_manifest_should_be(backend: Backend, where: str) -> None:
    two_epochs(backend)
    relpath = layout.manifest_name(2)
    backend.write(f"{relpath}/inside.json", b"{}")
    fresh = backend.open()
    assert fresh.latest_epoch == 2
    assert_corrupt(lambda: fresh.snapshot(), backend, relpath, 1, "is a directory")
    assert_corrupt(lambda: fresh.manifest(2), backend, relpath, 1, "is a directory")


@cases("field", {"manifest": "manifest"}, s3=("manifest",))
def test_a_manifest_nested_past_the_parsers_stack(backend: Backend, field: str) -> None:
    two_epochs(backend)
    relpath = layout.manifest_name(1)
    backend.write(relpath, DEEP)
    assert_corrupt(lambda: backend.open().snapshot(), backend, relpath, 0, "nested too deeply")


def test_a_manifest_without_an_incarnation_still_reads(local_backend: Backend) -> None:
    """Manifests written before incarnations existed have no such field."""
    store = two_epochs(local_backend)
    relpath = layout.manifest_name(1)
    data = json.loads(local_backend.read(relpath))
    assert data.pop("incarnation") is None
    local_backend.write(relpath, json.dumps(data).encode())
    assert local_backend.open().manifest(1).incarnation is None
    assert local_backend.open().snapshot(1).lookup(A).tolist() == store.snapshot(1).lookup(A).tolist()


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_a_manifests_incarnation_must_be_a_count(local_backend: Backend, bad) -> None:
    two_epochs(local_backend)
    relpath = _edit_manifest(local_backend, 1, incarnation=bad)
    assert_corrupt(lambda: local_backend.open().snapshot(), local_backend, relpath, 0, "incarnation")


def test_an_older_stores_delta_names_still_merge_in_time_order(local_backend: Backend) -> None:
    """Deltas named by flush time (before incarnations) are merged first, in time order."""
    store = local_backend.open()
    directory = layout.delta_dir(0)
    legacy = {}
    for time_ns, score in ((2_000, 2.0), (1_000, 1.0)):  # the later flush holds 2.0
        writer = store.writer(0)
        writer.record(["a"], [score])
        new = writer.flush()
        legacy[time_ns] = f"{directory}/{time_ns:020d}-r00000-s000000-{time_ns:012x}.arrow"
        local_backend.write(legacy[time_ns], local_backend.read(new))
        local_backend.remove(new)
    assert store.commit(0).deltas == (legacy[1_000], legacy[2_000])
    assert store.snapshot().lookup(["a"]).tolist() == [2.0]


def test_scores_that_cancel_open_whatever_the_summing_order(local_backend: Backend) -> None:
    """The stored sum is checked against the scores up to rounding that scales with their
    magnitudes: 1e30, -1e30 and 1 sum to 1 in file order and to 0 in another order (the
    merge sums ranges of its own), and neither is damage."""
    store = local_backend.open()
    with store.writer(0) as writer:
        writer.record(A, EPOCH0)
    store.commit(0)
    relpath = store.manifest(0).snapshot
    cols = [np.array([1, 2, 3], np.uint64), np.float32([1e30, -1e30, 1.0]), np.zeros(3, np.uint32)]
    meta = {"kind": "snapshot", "epoch": 0, "mean": 0.0, "score_sum": 0.0}
    data, digest = _table_bytes(SNAPSHOT_SCHEMA, cols, meta)
    local_backend.write(relpath, data)
    _edit_manifest(local_backend, 0, snapshot_bytes=len(data), snapshot_xxh3=digest, mean=0.0,
                   score_sum=0.0, keys=3)
    snap = local_backend.open().snapshot(0)
    assert snap.mean == 0.0 and snap.scores.tolist() == cols[1].tolist()
    # a sum off by more than rounding is still refused
    meta = dict(meta, score_sum=1e22, mean=1e22 / 3)
    data, digest = _table_bytes(SNAPSHOT_SCHEMA, cols, meta)
    local_backend.write(relpath, data)
    _edit_manifest(local_backend, 0, snapshot_bytes=len(data), snapshot_xxh3=digest, mean=1e22 / 3,
                   score_sum=1e22)
    assert_corrupt(lambda: local_backend.open().snapshot(0), local_backend, relpath, None, "sum to")

"""Bad URLs and damaged files: every one is refused with an error that names the file at fault
(and, for a damaged store, the last good epoch); none is ever read as scores."""

from __future__ import annotations

import json

import pytest

from infobatch_stream.storage import CorruptStoreError, NotAStoreError, ScoreStore, layout

from .conftest import Backend

A = ["a", "b", "c"]
EPOCH0 = [1.0, 2.0, 3.0]
EPOCH1 = [10.0, 20.0, 30.0]
HEX = "0123456789abcdef" * 2


def cases(names: str, values: dict, s3: tuple = ()):
    """Parametrize over ``values`` (id -> value) on the local backend, and over the ids in
    ``s3`` on the S3 server too: the checks are the same code on both, a request costs time."""
    names = ["backend", *[n.strip() for n in names.split(",")]]
    params = []
    for where in ("local", "s3"):
        for ident, value in values.items():
            if where == "local" or ident in s3:
                value = value if isinstance(value, tuple) and len(names) > 2 else (value,)
                params.append(pytest.param(where, *value, id=f"{where}-{ident}"))
    return pytest.mark.parametrize(names, params, indirect=["backend"])


def two_epochs(backend: Backend) -> ScoreStore:
    store = backend.open()
    for epoch, scores in ((0, EPOCH0), (1, EPOCH1)):
        with store.writer(epoch) as writer:
            writer.record(A, scores)
        store.commit(epoch)
    return store


def epoch1_of_two_ranks(backend: Backend, rank1_keys: list[str],
                        rank1_scores: list[float]) -> tuple[ScoreStore, str]:
    """Epoch 0 committed, epoch 1's deltas written by two ranks; returns the store and the
    path of rank 1's delta (the one the tests damage)."""
    store = backend.open()
    with store.writer(0) as writer:
        writer.record(A, EPOCH0)
    store.commit(0)
    with store.writer(1, rank=0) as writer:
        writer.record(["a"], [10.0])
    with store.writer(1, rank=1) as writer:
        writer.record(rank1_keys, rank1_scores)
    return store, store.pending_deltas(1)[1]


def assert_epoch0_intact(backend: Backend) -> None:
    assert backend.open().snapshot(0).lookup(A).tolist() == EPOCH0


def assert_corrupt(call, backend: Backend, relpath: str, last_good: int | None, problem: str = ""):
    with pytest.raises(CorruptStoreError) as info:
        call()
    err = info.value
    assert err.path == backend.path(relpath)
    assert err.last_good_epoch == last_good
    shown = "none" if last_good is None else str(last_good)
    assert relpath in str(err) and f"Last good epoch: {shown}" in str(err)
    assert problem in err.problem
    return err


# -- URLs that are not stores -----------------------------------------------------------------

def test_a_url_holding_other_files_is_not_a_store(backend: Backend) -> None:
    backend.write("README.txt", b"my dataset")
    backend.write("images/0001.png", b"\x89PNG")
    before = backend.files()
    store = backend.open()
    for action in (lambda: store.latest_epoch, lambda: store.snapshot(), lambda: store.commit(0)):
        with pytest.raises(NotAStoreError, match="holds other files") as info:
            action()
        assert backend.url in str(info.value) and "README.txt" in str(info.value)
    writer = store.writer(0)
    writer.record(["a"], [1.0])
    with pytest.raises(NotAStoreError):
        writer.flush()
    assert backend.files() == before  # nothing written, nothing removed


def test_a_url_that_is_a_file_is_not_a_store(backend: Backend) -> None:
    backend.fs.pipe_file(backend.root, b"a file, not a directory")
    store = backend.open()
    for action in (lambda: store.latest_epoch, lambda: store.commit(0)):
        with pytest.raises(NotAStoreError, match="is a file") as info:
            action()
        assert backend.url in str(info.value)
    writer = store.writer(0)
    writer.record(["a"], [1.0])
    with pytest.raises(NotAStoreError):
        writer.flush()

def test_another_rank_creating_the_store_between_our_checks_is_not_a_foreign_url(
        backend: Backend) -> None:
    """Rank 0 finds no marker; before it lists the URL, rank 1 creates the store and flushes a
    delta. Rank 0 must see a store being created, not "files and no marker" (torchrun on S3
    failed this way under load)."""
    ours, theirs = backend.open(), backend.open()
    listed = ours.files.list

    def list_after_the_other_rank_wrote(directory):
        ours.files.list = listed  # once: the listing that follows the missing marker
        with theirs.writer(0, rank=1) as writer:
            writer.record(["b"], [2.0])
        return listed(directory)

    ours.files.list = list_after_the_other_rank_wrote
    with ours.writer(0, rank=0) as writer:
        writer.record(["a"], [1.0])
    assert ours.files.list == listed  # the race was staged
    ours.commit(0)
    assert backend.open().snapshot(0).lookup(["a", "b"]).tolist() == [1.0, 2.0]



@cases("marker", {
    "newer-format": json.dumps({"format": "infobatch-stream/99",
                                "key_hash": "xxh3_64(utf-8 key), seed 0"}).encode(),
    "other-hash": json.dumps({"format": "infobatch-stream/1", "key_hash": "md5"}).encode(),
    "garbage": b"\x00\xffnot json",
}, s3=("garbage",))
def test_a_foreign_marker_is_refused(backend: Backend, marker: bytes) -> None:
    backend.write(layout.MARKER, marker)
    with pytest.raises(NotAStoreError) as info:
        backend.open().latest_epoch
    assert backend.path(layout.MARKER) in str(info.value)


@pytest.mark.parametrize("url", ["", 42, None])
def test_bad_url_arguments(url) -> None:
    with pytest.raises((TypeError, ValueError)):
        ScoreStore(url)


# -- damaged snapshots ------------------------------------------------------------------------

def test_a_truncated_snapshot(backend: Backend) -> None:
    store = two_epochs(backend)
    relpath = store.manifest(1).snapshot
    raw = backend.read(relpath)
    backend.write(relpath, raw[: len(raw) // 2])
    fresh = backend.open()
    assert_corrupt(lambda: fresh.snapshot(), backend, relpath, 0, "bytes")
    assert_corrupt(lambda: fresh.commit(2), backend, relpath, 0)  # never builds on it
    assert_epoch0_intact(backend)


def test_a_snapshot_damaged_in_place(backend: Backend) -> None:
    """Same size, one flipped byte in the score column: the checksum refuses it."""
    store = two_epochs(backend)
    relpath = store.manifest(1).snapshot
    raw = bytearray(backend.read(relpath))
    snap = store.snapshot(1)
    score_bytes = snap.scores.tobytes()
    at = bytes(raw).find(score_bytes)
    assert at > 0
    raw[at + 5] ^= 0x40
    backend.write(relpath, bytes(raw))
    assert_corrupt(lambda: backend.open().snapshot(1), backend, relpath, 0, "checksum")
    assert_epoch0_intact(backend)


def test_a_snapshot_whose_stored_mean_was_damaged(backend: Backend) -> None:
    """The mean lives in the file's metadata, outside the column checksum; the manifest's
    copy catches a change (a wrong mean is a wrong pruning threshold)."""
    store = two_epochs(backend)
    relpath = store.manifest(1).snapshot
    raw = bytearray(backend.read(relpath))
    at = 0
    while (at := bytes(raw).find(b'"mean": ', at) + 1):  # the schema is in the header and footer
        digit = at - 1 + len(b'"mean": ')
        assert chr(raw[digit]).isdigit()
        raw[digit] = ord("9") if raw[digit] != ord("9") else ord("8")  # same length, valid JSON
    backend.write(relpath, bytes(raw))
    assert_corrupt(lambda: backend.open().snapshot(1), backend, relpath, 0, "mean")


def test_a_missing_snapshot(backend: Backend) -> None:
    store = two_epochs(backend)
    relpath = store.manifest(1).snapshot
    backend.remove(relpath)
    assert_corrupt(lambda: backend.open().snapshot(), backend, relpath, 0, "missing")
    assert_epoch0_intact(backend)


def test_the_last_good_epoch_is_none_when_every_epoch_is_damaged(backend: Backend) -> None:
    store = two_epochs(backend)
    for epoch in (0, 1):
        relpath = store.manifest(epoch).snapshot
        backend.write(relpath, backend.read(relpath)[:100])
    assert_corrupt(lambda: backend.open().snapshot(1), backend, store.manifest(1).snapshot, None)


# -- damaged manifests ------------------------------------------------------------------------

def _edit_manifest(backend: Backend, which: int, **fields) -> str:
    relpath = layout.manifest_name(which)
    data = json.loads(backend.read(relpath))
    data.update(fields)
    backend.write(relpath, json.dumps(data).encode())
    return relpath


@cases("raw", {"syntax": b"{not json", "empty": b"", "list": b"[1, 2]", "binary": b"\xff\xfe",
               "fields-missing": b'{"format": "infobatch-stream/1"}'}, s3=("syntax",))
def test_a_garbage_manifest(backend: Backend, raw: bytes) -> None:
    two_epochs(backend)
    relpath = layout.manifest_name(1)
    backend.write(relpath, raw)
    fresh = backend.open()
    assert fresh.latest_epoch == 1
    assert_corrupt(lambda: fresh.snapshot(), backend, relpath, 0, "manifest")
    assert_corrupt(lambda: fresh.commit(2), backend, relpath, 0)
    assert_epoch0_intact(backend)



@cases("snapshot", {
    "dotdot": "../x.arrow",
    "dotdot-valid-name": f"../snapshots/epoch-00000001-{HEX}.arrow",
    "absolute": f"/etc/epoch-00000001-{HEX}.arrow",
    "other-bucket": f"s3://another-bucket/snapshots/epoch-00000001-{HEX}.arrow",
    "sibling": "../elsewhere/{outside}",  # a real snapshot of the store next door
    "inner-dotdot": f"snapshots/../../elsewhere/epoch-00000001-{HEX}.arrow",
    "trailing-dotdot": f"snapshots/epoch-00000001-{HEX}.arrow/../../../x",
    "other-epoch": f"snapshots/epoch-00000000-{HEX}.arrow",
    "null": None,
}, s3=("other-bucket", "sibling"))
def test_a_manifest_naming_a_path_outside_the_store(backend: Backend, snapshot) -> None:
    two_epochs(backend)
    # a valid store next to this one, whose snapshot of epoch 1 is readable and says 666
    outside = backend.sibling("elsewhere").open()
    for epoch in (0, 1):
        with outside.writer(epoch) as writer:
            writer.record(A, [666.0] * 3)
        outside.commit(epoch)
    if snapshot is not None:
        snapshot = snapshot.format(outside=outside.manifest(1).snapshot)
    relpath = _edit_manifest(backend, 1, snapshot=snapshot)
    err = assert_corrupt(lambda: backend.open().snapshot(), backend, relpath, 0, "inside the store")
    assert "666" not in str(err)


@cases("deltas", {
    "dotdot": ["../deltas/epoch-00000001/x.arrow"],
    "not-a-list": "not-a-list",
    "other-epoch": ["deltas/epoch-00000000/00000000000000000001-r00000-s000000-0123456789ab.arrow"],
}, s3=("dotdot",))
def test_a_manifest_naming_bad_deltas(backend: Backend, deltas) -> None:
    two_epochs(backend)
    relpath = _edit_manifest(backend, 1, deltas=deltas)
    assert_corrupt(lambda: backend.open().snapshot(), backend, relpath, 0, "deltas")


def test_a_manifest_naming_a_missing_snapshot(backend: Backend) -> None:
    two_epochs(backend)
    missing = f"snapshots/epoch-00000001-{HEX}.arrow"
    _edit_manifest(backend, 1, snapshot=missing)
    assert_corrupt(lambda: backend.open().snapshot(), backend, missing, 0, "missing")


@cases("field, value, problem", {
    "size": ("snapshot_bytes", 12, "bytes"),
    "checksum": ("snapshot_xxh3", "0123456789abcdef", "checksum"),
    "mean": ("mean", 15.0, "mean"),
    "keys": ("keys", -1, "non-negative"),
    "format": ("format", "infobatch-stream/2", "format"),
}, s3=("checksum",))
def test_a_manifest_that_does_not_match_its_snapshot(backend: Backend, field, value, problem) -> None:
    store = two_epochs(backend)
    manifest_path = layout.manifest_name(1)
    snapshot_path = store.manifest(1).snapshot
    _edit_manifest(backend, 1, **{field: value})
    at_fault = snapshot_path if field in ("snapshot_bytes", "snapshot_xxh3", "mean") else manifest_path
    assert_corrupt(lambda: backend.open().snapshot(), backend, at_fault, 0, problem)
    assert_epoch0_intact(backend)


def test_a_manifest_of_another_epoch(backend: Backend) -> None:
    two_epochs(backend)
    relpath = layout.manifest_name(1)
    backend.write(relpath, backend.read(layout.manifest_name(0)))
    assert_corrupt(lambda: backend.open().snapshot(), backend, relpath, 0, "describes epoch 0")


@cases("field, literal", {
    "nan-mean": ("mean", b"NaN"),
    "infinite-mean": ("mean", b"Infinity"),
    "overflowing-mean": ("mean", b"1e999"),  # valid JSON syntax, parses as inf
    "infinite-sum": ("score_sum", b"-Infinity"),
}, s3=("nan-mean",))
def test_a_manifest_with_a_non_finite_number(backend: Backend, field: str, literal: bytes) -> None:
    """Python's json reads NaN and Infinity; the store never writes them and refuses them
    (a NaN mean would be a threshold that prunes nothing)."""
    two_epochs(backend)
    relpath = layout.manifest_name(1)
    raw = backend.read(relpath)
    data = json.loads(raw)
    old = f'"{field}": {data[field]!r}'.encode()
    assert old in raw
    backend.write(relpath, raw.replace(old, f'"{field}": '.encode() + literal))
    problem = "not a JSON number" if literal.isalpha() or literal.startswith(b"-I") else "finite"
    assert_corrupt(lambda: backend.open().snapshot(), backend, relpath, 0, problem)


@cases("edit", {"truncated": "truncated", "repeated-field": "repeated"}, s3=("truncated",))
def test_a_truncated_or_ambiguous_manifest(backend: Backend, edit: str) -> None:
    two_epochs(backend)
    relpath = layout.manifest_name(1)
    raw = backend.read(relpath)
    if edit == "truncated":
        damaged = raw[: len(raw) * 2 // 3]
    else:  # the last "epoch" would win in Python's json
        damaged = raw.replace(b'"epoch": 1,', b'"epoch": 1, "epoch": 0,')
        assert damaged != raw
    backend.write(relpath, damaged)
    assert_corrupt(lambda: backend.open().snapshot(), backend, relpath, 0,
                   "not valid JSON" if edit == "truncated" else "appears twice")


def test_a_snapshot_replaced_by_a_delta_file(backend: Backend) -> None:
    """Right format, wrong schema (two columns, not three): refused, naming the file."""
    store = two_epochs(backend)
    writer = store.writer(2)
    writer.record(A, [5.0, 6.0, 7.0])
    delta = writer.flush()
    relpath = store.manifest(1).snapshot
    raw = backend.read(delta)
    backend.write(relpath, raw)
    assert_corrupt(lambda: backend.open().snapshot(1), backend, relpath, 0, "bytes")
    _edit_manifest(backend, 1, snapshot_bytes=len(raw))  # past the size check too
    assert_corrupt(lambda: backend.open().snapshot(1), backend, relpath, 0, "schema")


# -- symbolic links in a local store ----------------------------------------------------------

@pytest.mark.parametrize("which", ["snapshot", "manifest", "marker", "delta"])
def test_a_symlink_leading_outside_the_store_is_refused(local_backend: Backend, which: str) -> None:
    """Decided: a local store never follows a link out of its root (its own directory may be
    a link). A file replaced by a link to a valid store elsewhere is refused as damage,
    never read: the outside store's scores (666) appear nowhere."""
    import os

    backend = local_backend
    store = two_epochs(backend)
    outside = backend.sibling("elsewhere").open()
    for epoch in (0, 1, 2):
        with outside.writer(epoch) as writer:
            writer.record(A, [666.0] * 3)
        if epoch < 2:
            outside.commit(epoch)
    target = {"snapshot": outside.manifest(1).snapshot, "manifest": layout.manifest_name(1),
              "marker": layout.MARKER, "delta": outside.pending_deltas(2)[0]}[which]
    if which == "delta":
        with store.writer(2) as writer:
            writer.record(["a"], [1.0])
        relpath = store.pending_deltas(2)[0]
    else:
        relpath = {"snapshot": store.manifest(1).snapshot, "manifest": layout.manifest_name(1),
                   "marker": layout.MARKER}[which]
    os.unlink(backend.path(relpath))
    os.symlink(os.path.join(outside.root, target), backend.path(relpath))
    fresh = backend.open()
    if which == "marker":
        with pytest.raises(NotAStoreError, match="symbolic link"):
            fresh.latest_epoch
        return
    call = (lambda: fresh.commit(2)) if which == "delta" else (lambda: fresh.snapshot(1))
    err = assert_corrupt(call, backend, relpath, 0 if which != "delta" else 1, "symbolic link")
    assert "666" not in str(err)


def test_a_store_whose_root_is_a_symlink_works(tmp_path) -> None:
    """The root itself may be a link (a store placed on another disk)."""
    import os

    real = tmp_path / "disk" / "scores"
    real.mkdir(parents=True)
    os.symlink(real, tmp_path / "scores")
    store = ScoreStore(str(tmp_path / "scores"))
    with store.writer(0) as writer:
        writer.record(A, EPOCH0)
    store.commit(0)
    assert ScoreStore(str(tmp_path / "scores")).snapshot().lookup(A).tolist() == EPOCH0


# -- damaged deltas at commit -----------------------------------------------------------------

@cases("damage", {d: d for d in ("truncated", "garbage", "other-epoch", "snapshot-file")},
       s3=("truncated",))
def test_a_corrupt_delta_fails_the_commit_and_changes_nothing(backend: Backend, damage: str) -> None:
    store, relpath = epoch1_of_two_ranks(backend, ["b"], [20.0])
    raw = backend.read(relpath)
    if damage == "truncated":
        backend.write(relpath, raw[:-40])
    elif damage == "garbage":
        backend.write(relpath, b"\x00" * len(raw))
    elif damage == "other-epoch":  # a delta of epoch 2, renamed into epoch 1's directory
        later = store.writer(2)
        later.record(["b"], [99.0])
        other = later.flush()
        backend.write(relpath, backend.read(other))
        backend.remove(other)
    else:
        backend.write(relpath, backend.read(store.manifest(0).snapshot))
    before = backend.files()
    fresh = backend.open()
    assert_corrupt(lambda: fresh.commit(1), backend, relpath, 0, "delta")
    assert backend.files() == before
    assert fresh.epochs == [0]
    assert_epoch0_intact(backend)
    # once the bad file is dealt with, the commit goes through
    backend.remove(relpath)
    fresh.commit(1)
    snap = backend.open().snapshot(1)
    assert snap.lookup(A).tolist() == [10.0, 2.0, 3.0]

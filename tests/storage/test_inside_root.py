"""Deletes stay inside: retention and clean-up remove only files inside the store's root,
never through a folder that is a symbolic link; a local store whose folders are links is
refused with an error that names the link (linking the store's root instead works)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from infobatch_stream.storage import ScoreStore, StoreError, layout

from .conftest import Backend


def _precious(directory: Path) -> dict[str, bytes]:
    """Files outside the store that look like the store's own (a delta, a temporary)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "00000000000000000001-r00000-s000000-0123456789ab.arrow": b"someone else's data",
        ".tmp-0123456789abcdef0123456789abcdef-x.arrow": b"someone else's temporary",
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
        os.utime(directory / name, (0, 0))  # old: a sweep would take it for a stale temporary
    return files


def _assert_untouched(directory: Path, files: dict[str, bytes]) -> None:
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == files


def test_a_linked_delta_folder_is_refused_and_its_target_never_deleted(local_backend: Backend,
                                                                        tmp_path: Path) -> None:
    """``deltas/epoch-00000001`` is a link to a folder elsewhere. Retention used to list it
    through the link and delete the target's files (they look like deltas and temporaries);
    now the commit refuses the store, naming the link, before it writes anything."""
    store = local_backend.open()
    with store.writer(0) as writer:
        writer.record(["a"], [1.0])
    store.commit(0)
    elsewhere = tmp_path / "elsewhere"
    files = _precious(elsewhere)
    link = Path(local_backend.path(layout.delta_dir(1)))
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(elsewhere, link)
    before = local_backend.files()
    with pytest.raises(StoreError, match="is a symbolic link") as info:
        local_backend.open().commit(1)
    assert str(link) in str(info.value) and "link the store's root instead" in str(info.value)
    _assert_untouched(elsewhere, files)
    assert local_backend.files() == before
    # A commit of the epoch before the link (no listing of the linked folder needed) is
    # refused too: retention would walk every epoch folder.
    with pytest.raises(StoreError, match="is a symbolic link"):
        local_backend.open().commit(0)
    _assert_untouched(elsewhere, files)


def test_a_linked_epoch_folder_of_a_committed_epoch_is_never_emptied(local_backend: Backend,
                                                                      tmp_path: Path) -> None:
    """The linked folder is an epoch already committed: its clean-up would delete inside it."""
    store = local_backend.open()
    with store.writer(0) as writer:
        writer.record(["a"], [1.0])
    store.commit(0)
    elsewhere = tmp_path / "elsewhere"
    files = _precious(elsewhere)
    os.makedirs(local_backend.path(layout.DELTAS), exist_ok=True)
    os.symlink(elsewhere, local_backend.path(layout.delta_dir(0)))
    with store.writer(1) as writer:
        writer.record(["a"], [2.0])
    with pytest.raises(StoreError, match=r"deltas/epoch-00000000 is a symbolic link"):
        store.commit(1)
    _assert_untouched(elsewhere, files)
    assert store.epochs == [0]


@pytest.mark.parametrize("folder", [layout.MANIFESTS, layout.SNAPSHOTS, layout.DELTAS, layout.RUNS])
def test_a_store_whose_folders_are_links_says_so(local_backend: Backend, tmp_path: Path,
                                                 folder: str) -> None:
    """Snapshots moved to another volume and linked back: refused at first use, naming the
    link and what works instead; then linking the whole root (the same files) works."""
    store = local_backend.open()
    store.begin_run(None)
    for epoch in (0, 1):
        with store.writer(epoch) as writer:
            writer.record(["a", "b"], [float(epoch), 2.0])
        if epoch == 0:
            store.commit(0)
    moved = tmp_path / "volume" / folder
    moved.parent.mkdir()
    os.rename(local_backend.path(folder), moved)
    os.symlink(moved, local_backend.path(folder))
    before = {p.name for p in moved.iterdir()}
    fresh = local_backend.open()
    for use in (lambda: fresh.snapshot(), lambda: fresh.commit(1), lambda: fresh.begin_run(None)):
        with pytest.raises(StoreError, match="symbolic link") as info:
            use()
        assert local_backend.path(folder) in str(info.value)
        assert "link the store's root instead" in str(info.value)
    assert {p.name for p in moved.iterdir()} == before  # nothing written or removed there
    # What works: the folder back in place, the whole store on the other volume, root linked.
    os.unlink(local_backend.path(folder))
    os.rename(moved, local_backend.path(folder))
    volume = tmp_path / "volume" / "store"
    os.rename(local_backend.root, volume)
    os.symlink(volume, local_backend.root)
    linked = ScoreStore(local_backend.root)
    assert linked.commit(1).keys == 2
    assert linked.snapshot().lookup(["a", "b"]).tolist() == [1.0, 2.0]


def test_retention_never_removes_a_folder_or_follows_a_link_to_a_file(local_backend: Backend,
                                                                        tmp_path: Path) -> None:
    """A delta that is a link to a file outside is removed as a link; its target stays."""
    store = local_backend.open()
    with store.writer(0) as writer:
        writer.record(["a"], [1.0])
    store.commit(0)
    target = tmp_path / "outside.arrow"
    target.write_bytes(b"not the store's")
    late = local_backend.path(f"{layout.delta_dir(0)}/i00000000-r00001-s000000-0123456789ab.arrow")
    os.makedirs(os.path.dirname(late), exist_ok=True)
    os.symlink(target, late)
    with store.writer(1) as writer:
        writer.record(["a"], [2.0])
    store.commit(1)
    assert target.read_bytes() == b"not the store's"
    assert not os.path.lexists(late)

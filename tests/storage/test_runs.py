"""One run per store, fencing and clock-free order: ``ScoreStore.begin_run`` and its leases.

A run with a run id and one without, in either order, never merge each other's deltas, and
the refused one is told who owns the store; a superseded incarnation (paused, or left behind
by a restart that took over) can neither write nor commit, and its late deltas are never
merged; a re-run's writes win over the crashed attempt's whatever the clocks say; the store
remembers the run's settings and refuses others unless taken over."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from infobatch_stream.storage import (
    FencedError,
    OwnershipError,
    RunLease,
    SettingsMismatchError,
    layout,
    runs,
)
from infobatch_stream.storage import writer as writer_module

from .conftest import Backend
from .helpers import REPO, child_env

SETTINGS = {"policy": "InfoBatchPolicy", "num_epochs": 10, "prune_ratio": 0.5, "delta": 0.875,
            "seed": 0, "key": "__key__"}


def describe(run_id: str | None) -> str:
    return "a run with no run id" if run_id is None else f"run {run_id!r}"


@pytest.mark.parametrize(("first", "second"), [(None, "job-b"), ("job-a", None), ("job-a", "job-b")])
def test_two_runs_never_mix_in_any_combination(backend: Backend, caplog, first, second) -> None:
    """The second run is refused, told the owner (its run id, or that it has none, when and
    where it started); its deltas, written anyway, never reach the owner's snapshot, and the
    warning says two runs are writing (not that keys collide)."""
    store = backend.open()
    lease = store.begin_run(first, SETTINGS)
    with store.writer(0, lease=lease) as writer:
        writer.record(["a", "b"], [1.0, 2.0])
    # The other job writes too, before anyone commits (it never got a lease).
    with backend.open().writer(0, rank=1, run_id=second) as writer:
        writer.record(["a", "c"], [666.0, 666.0])
    other = backend.open()
    with pytest.raises(OwnershipError) as info:
        other.begin_run(second, SETTINGS)
    message = str(info.value)
    owner = f"belongs to {describe(first)} (incarnation 1, started {lease.created_at} on host {lease.host}"
    assert owner in message
    assert ("this run has no run id" if second is None else f"this run is {second!r}") in message
    assert "takeover=True" in message
    with pytest.raises(OwnershipError, match="belongs to"):  # nor can it commit without one
        other.commit(0, run_id=second)
    caplog.set_level(logging.WARNING)
    manifest = store.commit(0, lease=lease)
    assert "two runs are writing this store" in caplog.text and describe(second) in caplog.text
    assert "keys collide" not in caplog.text
    assert manifest.keys == 2 and manifest.duplicates == 0 and manifest.run_id == first
    snap = backend.open().snapshot(0)
    assert snap.lookup(["a", "b"]).tolist() == [1.0, 2.0] and np.isnan(snap.lookup(["c"])).all()
    assert backend.open().leftover_deltas() == {}  # retention removed the other run's delta


def test_a_run_without_a_run_id_resumes_its_own_store(backend: Backend) -> None:
    """Plain use: no run id finds a store owned by no run id: the same run, restarted."""
    store = backend.open()
    first = store.begin_run(None)
    with store.writer(0, lease=first) as writer:
        writer.record(["a"], [1.0])
    store.commit(0, lease=first)
    again = backend.open().begin_run(None)
    assert again.incarnation == first.incarnation + 1 and again.started_epoch == 1
    assert backend.open().run_record() == again


def test_an_older_store_without_run_records_is_owned_by_its_latest_manifest(backend: Backend) -> None:
    store = backend.open()
    with store.writer(0, run_id="job-a") as writer:
        writer.record(["a"], [1.0])
    committed = store.commit(0, run_id="job-a")
    assert store.run_record() is None
    with pytest.raises(OwnershipError, match=re.escape(
            f"belongs to run 'job-a' (it committed epoch 0 at {committed.created_at})")):
        backend.open().begin_run("job-b")
    with pytest.raises(OwnershipError, match="belongs to run 'job-a'"):
        backend.open().begin_run(None)
    assert backend.open().begin_run("job-a").incarnation == 1


def test_two_anonymous_jobs_the_later_one_fences_the_earlier(backend: Backend) -> None:
    """Two jobs without run ids at once look like a restart: the later begin_run supersedes
    the earlier, whose next write and commit are refused, naming who took over."""
    early = backend.open()
    early_lease = early.begin_run(None)
    writer = early.writer(0, lease=early_lease)
    writer.record(["a"], [1.0])
    writer.flush()
    late_lease = backend.open().begin_run(None)
    writer.record(["b"], [2.0])
    with pytest.raises(FencedError) as info:
        writer.flush()
    err = info.value
    assert err.incarnation == 1 and err.superseded_by == 2
    newer = (f"was superseded by a run with no run id (incarnation 2, started "
             f"{late_lease.created_at} on host {late_lease.host}, pid {late_lease.pid})")
    assert newer in str(err)
    assert "must stop" in str(err)
    assert writer.pending == 1  # still buffered: nothing is dropped, nothing written
    with pytest.raises(FencedError, match="cannot commit epoch 0"):
        early.commit(0, lease=early_lease)
    assert backend.open().epochs == []


def test_a_superseded_incarnations_late_deltas_are_never_merged(backend: Backend, monkeypatch,
                                                                   caplog) -> None:
    """A paused process of the run had flushed one delta before a restart took over (the
    restart inherits it); after the takeover its write slips past the fence (checked just
    before the new incarnation began). The new incarnation's commit merges the inherited
    delta and its own, never the late one, and says so."""
    store = backend.open()
    old = store.begin_run("job", SETTINGS)
    paused = store.writer(0, lease=old)
    paused.record(["a", "b"], [1.0, 1.0])
    inherited = paused.flush()
    new = backend.open().begin_run("job", SETTINGS)
    assert new.inherited == (inherited,) and new.started_epoch == 0
    monkeypatch.setattr(writer_module, "check_fence", lambda *args: None)  # past the check
    paused.record(["a", "c"], [666.0, 666.0])
    late = paused.flush()
    monkeypatch.undo()
    with backend.open().writer(0, lease=new) as writer:
        writer.record(["b"], [2.0])
    caplog.set_level(logging.WARNING)
    manifest = backend.open().commit(0, lease=new)
    assert late not in manifest.deltas and inherited in manifest.deltas
    assert manifest.incarnation == new.incarnation
    assert "superseded incarnation(s) 1" in caplog.text and late in caplog.text
    snap = backend.open().snapshot(0)
    assert snap.lookup(["a", "b"]).tolist() == [1.0, 2.0] and np.isnan(snap.lookup(["c"])).all()
    with pytest.raises(FencedError):  # and the paused process cannot commit either
        store.commit(1, lease=old)


def test_a_re_runs_writes_win_whatever_the_clocks_say(backend: Backend, monkeypatch, caplog) -> None:
    """The crashed attempt ran on a machine whose clock was ten minutes ahead; the re-run's
    machine is on time. Merge order comes from incarnations and sequence numbers, so the
    re-run's scores win (delta names held the flush time before: the attempt's won)."""
    real_ns = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real_ns() + 10 * 60 * 10**9)
    crashed = backend.open()
    lease = crashed.begin_run("job")
    with crashed.writer(0, rank=0, lease=lease) as writer:
        writer.record(["a", "b"], [1.0, 1.0])
    monkeypatch.setattr(time, "time_ns", real_ns)
    rerun = backend.open()
    again = rerun.begin_run("job")
    with rerun.writer(0, rank=0, lease=again) as writer:
        writer.record(["a"], [2.0])
    caplog.set_level(logging.WARNING)
    manifest = rerun.commit(0, lease=again)
    assert rerun.snapshot().lookup(["a", "b"]).tolist() == [2.0, 1.0]
    assert manifest.duplicates == 1
    assert "crashed attempt it resumed" in caplog.text and "keys collide\n" not in caplog.text


def test_settings_are_recorded_and_other_settings_refused_with_both_values(backend: Backend) -> None:
    store = backend.open()
    store.begin_run("job", SETTINGS)
    other = dict(SETTINGS, prune_ratio=0.3, seed=7)
    with pytest.raises(SettingsMismatchError) as info:
        backend.open().begin_run("job", other)
    message = str(info.value)
    assert "the store was written with prune_ratio=0.5, this run has prune_ratio=0.3" in message
    assert "the store was written with seed=0, this run has seed=7" in message
    assert info.value.differences == {"prune_ratio": (0.5, 0.3), "seed": (0, 7)}
    assert isinstance(info.value, OwnershipError)
    fewer = {k: v for k, v in SETTINGS.items() if k != "key"}
    with pytest.raises(SettingsMismatchError, match="written with key='__key__', this run has no key"):
        backend.open().begin_run("job", fewer)
    kept = backend.open().begin_run("job")  # no settings given: the recorded ones hold
    assert kept.settings == SETTINGS
    taken = backend.open().begin_run("job", other, takeover=True)
    assert backend.open().run_record() == taken and taken.settings == other


def test_a_takeover_by_another_run_leaves_the_old_runs_deltas_out(backend: Backend) -> None:
    store = backend.open()
    old = store.begin_run("job-a")
    with store.writer(0, lease=old) as writer:
        writer.record(["a"], [1.0])
    taker = backend.open()
    lease = taker.begin_run("job-b", takeover=True)
    assert lease.inherited  # listed, but written by another run: never merged
    with taker.writer(0, lease=lease) as writer:
        writer.record(["b"], [2.0])
    manifest = taker.commit(0, lease=lease)
    assert manifest.run_id == "job-b" and manifest.keys == 1
    with pytest.raises(FencedError):
        store.commit(0, lease=old)


@pytest.mark.parametrize("run_ids", [("", ""), ("job-a", "job-b")], ids=["same-run", "two-runs"])
def test_concurrent_begin_runs_take_distinct_incarnations(backend: Backend, tmp_path,
                                                          run_ids) -> None:
    """Two processes begin runs on one store at the same moment, many times over: every
    incarnation is taken exactly once (an exclusive create, never a rewritten file). Two
    different runs racing on an empty store: exactly one owns it, the other is refused."""
    go = tmp_path / "go"
    count = 8 if backend.name == "local" else 4
    procs = [subprocess.Popen(
        [sys.executable, str(REPO / "tests/storage/_begin_run_child.py"), backend.url,
         json.dumps(backend.storage_options or {}), run_id, str(count), str(go)],
        cwd=REPO, env=child_env(backend.env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for run_id in run_ids]
    time.sleep(0.5)
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    taken = [n for r in results for n in r["taken"]]
    assert len(taken) == len(set(taken))
    assert sorted(taken) == list(range(1, len(taken) + 1))
    store = backend.open()
    assert runs.incarnations(store.files)[-1] == len(taken)
    if run_ids[0] == run_ids[1]:
        assert len(taken) == 2 * count and not any(r["refused"] for r in results)
        return
    winner = [r for r in results if r["refused"] is None]
    loser = [r for r in results if r["refused"] is not None]
    assert len(winner) == 1 and len(loser) == 1 and not loser[0]["taken"]
    owner = store.run_record().run_id
    assert f"belongs to run {owner!r}" in loser[0]["refused"]


def test_run_records_stay_bounded_and_old_leases_stay_fenced(backend: Backend) -> None:
    store = backend.open()
    leases = [store.begin_run("job") for _ in range(runs.KEEP_RECORDS + 4)]
    with store.writer(0, lease=leases[-1]) as writer:
        writer.record(["a"], [1.0])
    store.commit(0, lease=leases[-1])
    kept = runs.incarnations(store.files)
    assert kept == [lease.incarnation for lease in leases[-runs.KEEP_RECORDS:]]
    with pytest.raises(FencedError, match=f"superseded by run 'job' \\(incarnation {len(leases)}"):
        _write(store, leases[0])


def _write(store, lease: RunLease) -> None:
    writer = store.writer(1, lease=lease)
    writer.record(["a"], [2.0])
    writer.flush()


def test_a_lease_travels_as_json_and_a_bad_one_is_refused() -> None:
    lease = RunLease("job", 3, dict(SETTINGS), "2026-01-01T00:00:00+00:00", "host-1", 42, 5,
                     (layout.delta_name(5, 2, 0, 0, "0123456789ab"),))
    assert RunLease.from_dict(json.loads(json.dumps(lease.to_dict()))) == lease
    for field, bad in (("incarnation", 0), ("incarnation", True), ("run_id", ""), ("pid", -1),
                       ("settings", {"r": float("nan")}), ("inherited", ["../x.arrow"]),
                       ("started_epoch", "5")):
        with pytest.raises((ValueError, TypeError)):
            RunLease.from_dict(dict(lease.to_dict(), **{field: bad}))
    with pytest.raises(ValueError, match="'host' is missing"):
        RunLease.from_dict({k: v for k, v in lease.to_dict().items() if k != "host"})


def test_a_damaged_run_record_is_a_corrupt_store_error(backend: Backend) -> None:
    from infobatch_stream.storage import CorruptStoreError

    store = backend.open()
    store.begin_run("job")
    backend.write(layout.incarnation_name(1), b"[" * 100_000)
    with pytest.raises(CorruptStoreError, match="nested too deeply") as info:
        backend.open().begin_run("job")
    assert info.value.path == backend.path(layout.incarnation_name(1))


def test_duplicates_expected_counts_without_the_collision_warning(backend: Backend, caplog) -> None:
    """A resampled stream repeats keys by design: counted in the manifest, not warned about."""
    store = backend.open()
    lease = store.begin_run("job")
    with store.writer(0, lease=lease) as writer:
        writer.record(["a", "b", "a"], [1.0, 2.0, 3.0])
    caplog.set_level(logging.WARNING)
    assert store.commit(0, lease=lease, duplicates_expected=True).duplicates == 1
    assert "keys collide" not in caplog.text and "updates hit a key" not in caplog.text
    with store.writer(1, lease=lease) as writer:
        writer.record(["a", "a"], [1.0, 3.0])
    assert store.commit(1, lease=lease).duplicates == 1
    assert "keys collide" in caplog.text


def test_begin_run_refuses_settings_that_are_not_json(backend: Backend) -> None:
    import infobatch_stream as ibs

    store = backend.open()
    for bad in ({"prune_ratio": float("nan")}, {"key": object()}, {1: "x"}, ["prune_ratio"]):
        with pytest.raises((TypeError, ValueError), match="settings"):
            store.begin_run("job", bad)
    with pytest.raises(ValueError, match="run_id"):
        store.begin_run("")
    assert store.run_record() is None
    assert ibs.RunLease is RunLease and ibs.FencedError is FencedError  # the package's face
    assert ibs.SettingsMismatchError is SettingsMismatchError and ibs.StorageFullError

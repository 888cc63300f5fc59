"""The training loop end to end: torchrun DDP on S3, a SIGKILL and restart, LR schedules."""

from __future__ import annotations

import json

import numpy as np
import pytest

import infobatch_stream as ibs

from .conftest import read_epochs, write_shards

UNEVEN = [120, 20, 90, 35, 60]  # rank 0 gets shards 0, 2, 4 (270); rank 1 gets 1, 3 (55)


def upload(fs, paths: list[str], bucket: str) -> list[str]:
    urls = []
    for path in paths:
        url = f"s3://{bucket}/shards/{path.rsplit('/', 1)[-1]}"
        fs.put_file(path, url)
        urls.append(url)
    return urls


def test_torchrun_two_ranks_on_s3_uneven_shards(tmp_path, s3_server, s3_bucket, run_trainer):
    shards = upload(s3_server.filesystem(), write_shards(tmp_path / "shards", UNEVEN), s3_bucket)
    store_url = f"s3://{s3_bucket}/runs/a/scores"
    out = tmp_path / "out"
    result = run_trainer(
        ["--shards", ",".join(shards), "--store", store_url, "--epochs", "4", "--batch", "8",
         "--workers", "2", "--out", str(out),
         "--storage-options", json.dumps(s3_server.storage_options)],
        env=dict(s3_server.env, INFOBATCH_STREAM_CACHE=str(tmp_path / "cache")), torchrun=2,
        timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-8000:]
    logs = read_epochs(out)
    assert sorted(logs) == [(r, e) for r in (0, 1) for e in range(4)]

    store = ibs.ScoreStore(store_url, s3_server.storage_options, cache_dir=str(tmp_path / "c2"))
    trained = {}
    for epoch in range(4):
        # Both ranks took the same number of steps, though their shards hold 270 vs 55 samples.
        assert logs[(0, epoch)]["steps"] == logs[(1, epoch)]["steps"] > 0
        keys = logs[(0, epoch)]["keys"] + logs[(1, epoch)]["keys"]
        losses = np.array(logs[(0, epoch)]["losses"] + logs[(1, epoch)]["losses"], np.float32)
        assert len(set(keys)) == len(keys)  # the ranks' shards are disjoint
        if epoch >= 1:  # retention keeps the last 3 snapshots
            snap = store.snapshot(epoch)
            # Every key trained in the epoch is in that epoch's snapshot, with the loss it had.
            np.testing.assert_array_equal(snap.lookup(keys), losses)
            pos, found = snap.positions(ibs.hash_keys(keys))
            assert found.all() and (snap.epochs[pos] == epoch).all()
        trained[epoch] = len(keys)
    # Epochs 1..2 prune (annealing starts at floor(0.875 * 4) = 3), so they train fewer.
    assert trained[1] < trained[0] and trained[2] < trained[0]
    assert trained[3] == trained[0]  # annealing: everything again, weight 1
    assert store.latest_epoch == 3


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, run_trainer):
    shards = ",".join(write_shards(tmp_path / "shards", [100, 80, 60]))
    common = ["--shards", shards, "--epochs", "5", "--batch", "10", "--flush-rows", "20"]

    straight = tmp_path / "straight"
    result = run_trainer(common + ["--store", str(straight / "store"), "--out", str(straight),
                                   "--ckpt", str(straight / "ckpt.pt")])
    assert result.returncode == 0, result.stderr[-3000:]

    crashed = tmp_path / "crashed"
    args = common + ["--store", str(crashed / "store"), "--out", str(crashed),
                     "--ckpt", str(crashed / "ckpt.pt")]
    killed = run_trainer(args + ["--kill-at", "2:9"])
    assert killed.returncode == -9  # a real SIGKILL, in the middle of epoch 2
    store = ibs.ScoreStore(crashed / "store")
    assert store.latest_epoch == 1
    before = {e: store.snapshot(e).to_arrow() for e in store.epochs}
    assert store.pending_deltas(2), "the killed epoch had flushed deltas"

    resumed = run_trainer(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for epoch, table in before.items():  # no committed score was lost or changed
        if epoch in store.epochs:
            assert store.snapshot(epoch).to_arrow().equals(table)

    a, b = read_epochs(straight), read_epochs(crashed)
    assert sorted(a) == sorted(b) == [(0, e) for e in range(5)]
    for key in a:
        assert a[key]["keys"] == b[key]["keys"]  # same samples, same order, every epoch
        np.testing.assert_array_equal(a[key]["losses"], b[key]["losses"])
    final_a = ibs.ScoreStore(straight / "store").snapshot().to_arrow()
    final_b = store.snapshot().to_arrow()
    assert final_a.select(["hash", "score"]).equals(final_b.select(["hash", "score"]))


@pytest.mark.parametrize("delta", [0.875, 0.7])
def test_onecycle_from_planned_totals_never_overruns(tmp_path, run_trainer, delta):
    sizes = [130, 70, 100]
    shards = ",".join(write_shards(tmp_path / "shards", sizes))
    out = tmp_path / "out"
    result = run_trainer(["--shards", shards, "--store", str(tmp_path / "store"), "--epochs", "8",
                          "--delta", str(delta), "--batch", "10", "--onecycle",
                          "--dataset-size", str(sum(sizes)), "--out", str(out)])
    # OneCycleLR raises ValueError("Tried to step ... times") if stepped past its total.
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads((out / "plan.json").read_text())
    total = sum(e["steps"] for e in plan["epochs"])
    logs = read_epochs(out)
    steps = [logs[(0, e)]["steps"] for e in range(8)]
    assert sum(steps) <= total
    assert total - sum(steps) <= max(steps)  # ends within one epoch's worth of its total
    assert steps[1] < steps[0]  # pruning really happened


def test_torchrun_two_ranks_accumulation_overlapped_commit_and_metrics(tmp_path, run_trainer):
    shards = ",".join(write_shards(tmp_path / "shards", UNEVEN))
    out = tmp_path / "out"
    result = run_trainer(["--shards", shards, "--store", str(tmp_path / "store"), "--epochs", "4",
                          "--batch", "8", "--accumulate", "3", "--overlap", "--out", str(out)],
                         torchrun=2, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-8000:]
    logs = read_epochs(out)
    assert sorted(logs) == [(r, e) for r in (0, 1) for e in range(4)]
    store = ibs.ScoreStore(tmp_path / "store")
    for epoch in range(4):
        first, second = logs[(0, epoch)], logs[(1, epoch)]
        # the same micro-batches on both ranks (270 vs 55 samples), whole groups of 3
        assert first["steps"] == second["steps"] > 0 and first["steps"] % 3 == 0
        metrics = first["metrics"]
        others = {k: v for k, v in second["metrics"].items() if k != "blocking_seconds"}
        assert others == {k: v for k, v in metrics.items() if k != "blocking_seconds"}
        assert metrics["epoch"] == epoch
        assert metrics["optimizer_steps"] == first["steps"] // 3
        assert metrics["samples_trained"] == len(first["keys"]) + len(second["keys"])
        assert metrics["samples_pruned"] == first["planned_pruned"] == second["planned_pruned"]
        assert metrics["annealing"] is (epoch == 3)
        assert metrics["blocking_seconds"] > 0 and second["metrics"]["blocking_seconds"] > 0
        if epoch >= 1:  # retention keeps the last 3 snapshots
            assert metrics["mean_score"] == store.snapshot(epoch).mean
            assert metrics["keys_updated"] == store.manifest(epoch).updated
    assert logs[(0, 1)]["metrics"]["samples_pruned"] > 0 and logs[(0, 2)]["metrics"]["samples_pruned"] > 0
    assert store.latest_epoch == 3


def test_sigkill_during_an_overlapped_commit_then_resume_loses_no_score(tmp_path, run_trainer):
    """Killed while the overlapped commit of epoch 2 has uploaded its snapshot but not its
    manifest: the store stays at epoch 1, and the resumed run matches one never killed."""
    shards = ",".join(write_shards(tmp_path / "shards", [100, 80, 60]))
    common = ["--shards", shards, "--epochs", "5", "--batch", "10", "--flush-rows", "20",
              "--overlap"]

    straight = tmp_path / "straight"
    result = run_trainer(common + ["--store", str(straight / "store"), "--out", str(straight),
                                   "--ckpt", str(straight / "ckpt.pt")])
    assert result.returncode == 0, result.stderr[-3000:]

    crashed = tmp_path / "crashed"
    args = common + ["--store", str(crashed / "store"), "--out", str(crashed),
                     "--ckpt", str(crashed / "ckpt.pt")]
    killed = run_trainer(args + ["--kill-in-commit", "2:before-manifest"])
    assert killed.returncode == -9, killed.stderr[-3000:]
    store = ibs.ScoreStore(crashed / "store")
    assert store.latest_epoch == 1
    before = {e: store.snapshot(e).to_arrow() for e in store.epochs}
    assert store.pending_deltas(2), "the killed epoch's scores were flushed before its commit"

    resumed = run_trainer(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for epoch, table in before.items():
        if epoch in store.epochs:
            assert store.snapshot(epoch).to_arrow().equals(table)
    a, b = read_epochs(straight), read_epochs(crashed)
    assert sorted(a) == sorted(b) == [(0, e) for e in range(5)]
    for key in a:  # same samples, same order, same losses, every epoch
        assert a[key]["keys"] == b[key]["keys"]
        np.testing.assert_array_equal(a[key]["losses"], b[key]["losses"])
    final_a = ibs.ScoreStore(straight / "store").snapshot().to_arrow()
    assert final_a.select(["hash", "score"]).equals(store.snapshot().to_arrow().select(["hash", "score"]))


def test_sigkill_after_an_overlapped_commits_manifest_keeps_the_whole_epoch(tmp_path, run_trainer):
    """Killed after the manifest of epoch 2, before its clean-up: epoch 2 is committed whole,
    with every score the epoch recorded, and the resumed run carries on from epoch 3."""
    shards = ",".join(write_shards(tmp_path / "shards", [100, 80, 60]))
    out = tmp_path / "out"
    args = ["--shards", shards, "--epochs", "5", "--batch", "10", "--flush-rows", "20",
            "--overlap", "--store", str(tmp_path / "store"), "--out", str(out),
            "--ckpt", str(tmp_path / "ckpt.pt")]
    killed = run_trainer(args + ["--kill-in-commit", "2:after-manifest"])
    assert killed.returncode == -9, killed.stderr[-3000:]
    store = ibs.ScoreStore(tmp_path / "store")
    assert store.latest_epoch == 2
    trained = json.loads((out / "rank0-trained2.json").read_text())
    snapshot = store.snapshot(2)
    np.testing.assert_array_equal(snapshot.lookup(trained["keys"]),
                                  np.array(trained["losses"], np.float32))
    assert store.manifest(2).updated == len(trained["keys"])
    table = snapshot.to_arrow()

    resumed = run_trainer(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continues at epoch 3" in resumed.stderr
    assert store.latest_epoch == 4 and store.snapshot(2).to_arrow().equals(table)
    assert sorted(read_epochs(out)) == [(0, e) for e in range(5) if e != 2]


def test_a_torchrun_relaunch_before_any_checkpoint_continues_the_run(tmp_path, run_trainer):
    """torchrun --standalone gives each launch a new TORCHELASTIC_RUN_ID. A job killed before
    it saved any checkpoint and launched again is the same run: the store takes it back (it
    refused it when the launcher's id was the run's), and it continues at the first
    uncommitted epoch."""
    shards = ",".join(write_shards(tmp_path / "shards", [60, 60]))
    args = ["--shards", shards, "--epochs", "3", "--batch", "10", "--store",
            str(tmp_path / "store"), "--out", str(tmp_path / "out")]
    killed = run_trainer(args + ["--kill-at", "1:2"], torchrun=2)
    assert killed.returncode != 0
    store = ibs.ScoreStore(tmp_path / "store")
    assert store.latest_epoch == 0
    relaunched = run_trainer(args, torchrun=2)
    assert relaunched.returncode == 0, relaunched.stderr[-3000:]
    assert store.latest_epoch == 2
    assert [store.manifest(e).run_id for e in store.epochs] == [None, None, None]
    assert store.run_record().incarnation > 1  # the relaunch took the run over, fencing the old

"""The ``infobatch-stream`` command: its figures against numpy's and the policy's on the same
data, Parquet export round trips, the plot, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infobatch_stream import ScoreStore, cli, hash_keys
from infobatch_stream.stages import InfoBatchPolicy

from .conftest import free_port

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def build_store(path, epochs: int = 4, keys_per_epoch: int = 800, **store_kwargs):
    """A store with ``epochs`` commits (the default retention keeps the last 3), a key
    recorded by two ranks in epoch 2 (duplicates), one inf in epoch 2, and one pending delta
    of the next epoch. Returns (store, {epoch: {key: float32 score}}) in last-write-wins order."""
    store = ScoreStore(str(path), **store_kwargs)
    rng = np.random.default_rng(42)
    known: dict[str, np.float32] = {}
    expected = {}
    for epoch in range(epochs):
        keys = [f"shard{i % 7}/{i:06d}" for i in range(keys_per_epoch * (epoch + 1))]
        scores = rng.lognormal(0.0, 0.8, len(keys)).astype(np.float32)
        with store.writer(epoch, rank=0, run_id="run-a") as writer:
            writer.record(keys, scores)
        known.update(zip(keys, scores, strict=True))
        if epoch == 2:  # rank 1 merges after rank 0, so its scores win; its inf is rejected
            with store.writer(epoch, rank=1, run_id="run-a") as writer:
                writer.record(keys[:3] + ["inf-key"], [9.0, 10.0, 11.0, np.inf])
            known.update(zip(keys[:3], np.float32([9.0, 10.0, 11.0]), strict=True))
        store.commit(epoch, run_id="run-a")
        expected[epoch] = dict(known)
    with store.writer(epochs, rank=0) as writer:
        writer.record(["pending"], [1.0])
    return store, expected


@pytest.fixture
def store_and_expected(tmp_path):
    return build_store(tmp_path / "scores")


def run_json(capsys, *argv):
    assert cli.main([*argv, "--json"]) == 0
    out = capsys.readouterr()
    return json.loads(out.out), out.err


def policy_pruned(snapshot, ratio, seed=0):
    rule = InfoBatchPolicy(num_epochs=10_000, prune_ratio=ratio, seed=seed).rule(
        snapshot.epoch + 1, snapshot)
    return len(snapshot) - rule.count_kept(snapshot)


def check_stats(report, scores: np.ndarray, snapshot, ratio, seed=0):
    snap = report["snapshot"]
    mean = np.mean(scores, dtype=np.float64)
    assert snap["keys"] == len(scores) == len(snapshot)
    assert snap["mean"] == pytest.approx(mean, rel=1e-12)
    qs = [0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1]
    assert list(snap["quantiles"].values()) == np.quantile(scores, qs).tolist()
    assert snap["quantiles"]["min"] == scores.min() and snap["quantiles"]["max"] == scores.max()
    below = int(np.count_nonzero(scores < mean))
    assert snap["below_mean"] == below
    assert snap["fraction_below_mean"] == below / len(scores)
    nxt = report["next_epoch"]
    assert nxt["epoch"] == snapshot.epoch + 1 and nxt["seed"] == seed
    assert nxt["pruned"] == policy_pruned(snapshot, ratio, seed)
    assert nxt["kept"] + nxt["pruned"] == len(scores)
    assert nxt["pruned_expected"] == pytest.approx(ratio * below)
    assert nxt["saved_fraction_expected"] == pytest.approx(ratio * below / len(scores))
    # Decisions are independent draws: the exact count is near its expectation.
    assert abs(nxt["pruned"] - ratio * below) < 5 * np.sqrt(below) + 1


def test_inspect_json_matches_numpy_and_policy(store_and_expected, capsys):
    store, expected = store_and_expected
    report, err = run_json(capsys, "inspect", store.url)
    assert report["latest_epoch"] == 3
    assert [row["epoch"] for row in report["epochs"]] == [1, 2, 3]  # retention kept the last 3
    for row in report["epochs"]:
        manifest = store.manifest(row["epoch"])
        assert row["keys"] == manifest.keys == len(expected[row["epoch"]])
        assert (row["updated"], row["new_keys"]) == (manifest.updated, manifest.new_keys)
        assert row["mean"] == manifest.mean and row["created_at"] == manifest.created_at
        assert row["run_id"] == "run-a"
        assert row["new_keys"] == 800  # rank 1's only new key had an inf score: rejected
    by_epoch = {row["epoch"]: row for row in report["epochs"]}
    assert by_epoch[2]["duplicates"] == 3 and by_epoch[2]["rejected_nonfinite"] == 1
    assert by_epoch[1]["duplicates"] == by_epoch[3]["duplicates"] == 0
    assert "WARNING: epoch 2: 3 updates hit a key already updated" in err
    assert "epoch 1:" not in err and "epoch 3:" not in err

    scores = np.array(list(expected[3].values()), np.float32)
    check_stats(report, scores, store.snapshot(), 0.5)
    assert report["pending_deltas"] == {"epoch": 4, "files": store.pending_deltas(4)}
    assert len(report["pending_deltas"]["files"]) == 1


def test_inspect_older_epoch_other_ratio_and_seed(store_and_expected, capsys):
    store, expected = store_and_expected
    report, _ = run_json(capsys, "inspect", store.url, "--epoch", "2", "--prune-ratio", "0.3",
                         "--seed", "7")
    scores = np.array(list(expected[2].values()), np.float32)
    assert report["snapshot"]["epoch"] == 2 and report["latest_epoch"] == 3
    check_stats(report, scores, store.snapshot(2), 0.3, seed=7)
    assert report["pending_deltas"]["epoch"] == 4  # pending is always the store's next epoch

    report, _ = run_json(capsys, "inspect", store.url, "--prune-ratio", "0")
    assert report["next_epoch"]["pruned"] == 0 and report["next_epoch"]["pruned_expected"] == 0


def test_inspect_table(store_and_expected, capsys):
    store, _ = store_and_expected
    assert cli.main(["inspect", store.url]) == 0
    out = capsys.readouterr()
    pruned = policy_pruned(store.snapshot(), 0.5)
    assert "3 retained epoch(s), latest 3" in out.out
    assert f"{pruned:,} keys pruned exactly" in out.out
    assert "r*P(score<mean)" in out.out and "below the mean:" in out.out
    assert "run-a" in out.out and "duplicates" in out.out
    assert "pending for epoch 4: 1 delta file(s)" in out.out
    assert out.err.count("WARNING") == 1 and "WARNING" not in out.out


def test_inspect_store_without_commit_and_clean_store(tmp_path, capsys):
    store = ScoreStore(str(tmp_path / "fresh"))
    with store.writer(0) as writer:
        writer.record(["a", "b"], [1.0, 2.0])
    report, err = run_json(capsys, "inspect", store.url)
    assert report["latest_epoch"] is None and report["epochs"] == [] and report["snapshot"] is None
    assert len(report["pending_deltas"]["files"]) == 1 and err == ""
    assert cli.main(["inspect", store.url]) == 0
    assert "pending for epoch 0: 1 delta file(s)" in capsys.readouterr().out

    store.commit(0)
    report, err = run_json(capsys, "inspect", store.url)
    assert report["snapshot"]["keys"] == 2 and report["snapshot"]["mean"] == 1.5
    assert err == ""  # no duplicates, no warning


def test_progress_bar_stays_quiet_off_a_tty(store_and_expected, capsys, monkeypatch):
    store, _ = store_and_expected
    from infobatch_stream.stages import policy

    monkeypatch.setattr(policy, "_PROGRESS_KEYS", 0)
    monkeypatch.setattr(policy, "_COUNT_CHUNK", 100)  # many chunks: a bar would have drawn
    report, err = run_json(capsys, "inspect", store.url)
    assert report["next_epoch"]["pruned"] == policy_pruned(store.snapshot(), 0.5)
    assert err.count("\n") == 1 and err.startswith("WARNING")  # the duplicates line only


def test_export_round_trips_exactly(store_and_expected, tmp_path, capsys):
    store, expected = store_and_expected
    out = tmp_path / "out" / "latest.parquet"
    out.parent.mkdir()
    assert cli.main(["export", store.url, str(out)]) == 0
    assert "wrote 3,200 keys of epoch 3" in capsys.readouterr().out
    table = pq.read_table(out)
    assert table.schema.remove_metadata() == pa.schema(
        [("hash", pa.uint64()), ("score", pa.float32()), ("epoch", pa.uint32())])
    assert table.equals(store.snapshot().to_arrow().replace_schema_metadata(table.schema.metadata))
    assert json.loads(table.schema.metadata[b"infobatch_stream"])["epoch"] == 3
    keys = list(expected[3])
    by_hash = dict(zip(table["hash"].to_numpy().tolist(), table["score"].to_numpy(), strict=True))
    assert [by_hash[h] for h in hash_keys(keys).tolist()] == [expected[3][k] for k in keys]
    assert os.listdir(out.parent) == ["latest.parquet"]  # no temporary file left behind

    assert cli.main(["export", store.url, str(out), "--epoch", "1"]) == 0  # replaces it
    older = pq.read_table(out)
    assert older.num_rows == len(expected[1]) and set(older["epoch"].to_pylist()) == {1}


def test_plot_writes_png(store_and_expected, tmp_path, capsys):
    store, _ = store_and_expected
    out = tmp_path / "scores.png"
    assert cli.main(["plot", store.url, str(out), "--bins", "30"]) == 0
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 600 and height >= 600  # three panels, one above the other
    assert "epochs 1, 2, 3" in capsys.readouterr().out


def test_plot_without_matplotlib(store_and_expected, tmp_path, capsys, monkeypatch):
    store, _ = store_and_expected
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    assert cli.main(["plot", store.url, str(tmp_path / "x.png")]) == 2
    assert "pip install 'infobatch-stream[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def corrupt_manifest(store):
    path = Path(store.url) / "manifests" / "epoch-00000003.json"
    path.write_text("{")
    return path


def missing_snapshot(store):
    path = Path(store.url) / store.manifest(3).snapshot
    path.unlink()
    return path


def truncated_snapshot(store):
    path = Path(store.url) / store.manifest(3).snapshot
    path.write_bytes(path.read_bytes()[:-100])
    return path


@pytest.mark.parametrize("damage", [corrupt_manifest, missing_snapshot, truncated_snapshot])
@pytest.mark.parametrize("command", ["inspect", "export", "plot"])
def test_damaged_store_exits_2_naming_the_file(store_and_expected, tmp_path, capsys, damage,
                                                command):
    store, _ = store_and_expected
    path = damage(store)
    argv = [command, store.url] + ([] if command == "inspect" else [str(tmp_path / "out")])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("infobatch-stream: error: ") and str(path) in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_urls_exit_2(tmp_path, capsys):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.csv").write_text("x")
    (tmp_path / "file").write_text("x")
    cases = {str(tmp_path / "missing"): "no score store here",
             str(tmp_path / "other"): "not a score store",
             str(tmp_path / "file"): "",  # the store's wording for a file may change
             "nosuchproto://bucket/x": "Protocol not known"}
    for url, message in cases.items():
        assert cli.main(["inspect", url]) == 2
        err = capsys.readouterr().err
        assert url in err and message in err and err.count("\n") == 1, err
        assert err.startswith("infobatch-stream: error: ")


def test_bad_arguments_and_missing_epoch(store_and_expected, tmp_path, capsys):
    store, _ = store_and_expected
    for argv in (["inspect", store.url, "--prune-ratio", "1"], ["inspect", store.url, "--epoch", "-1"],
                 ["plot", store.url, "x.png", "--bins", "0"], ["export", store.url],
                 ["inspect", store.url, "--storage-option", "novalue"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
    capsys.readouterr()
    assert cli.main(["inspect", store.url, "--epoch", "0"]) == 2  # retention dropped epoch 0
    assert "epoch 0 is not committed" in capsys.readouterr().err
    assert cli.main(["export", store.url, str(tmp_path / "no" / "dir.parquet")]) == 2
    assert str(tmp_path / "no" / "dir.parquet") in capsys.readouterr().err
    empty = ScoreStore(str(tmp_path / "empty"))
    with empty.writer(0) as writer:
        writer.record(["a"], [1.0])
    assert cli.main(["export", empty.url, str(tmp_path / "e.parquet")]) == 2
    assert "no epoch is committed yet" in capsys.readouterr().err


def test_storage_options_parse_as_json_when_they_can():
    args = cli.build_parser().parse_args(
        ["inspect", "s3://b/x", "--storage-option", "endpoint_url=http://127.0.0.1:9000",
         "--storage-option", "use_ssl=false", "--storage-option", "max_concurrency=4",
         "--storage-option", 'key="1234"', "--storage-option", "config_kwargs={\"a\": 1}",
         "--storage-option", "token=a=b"])
    assert dict(args.storage_options) == {
        "endpoint_url": "http://127.0.0.1:9000", "use_ssl": False, "max_concurrency": 4,
        "key": "1234", "config_kwargs": {"a": 1}, "token": "a=b"}


def run_command(command, *argv):
    return subprocess.run([*command, *argv], capture_output=True, text=True, timeout=120)


def test_console_script_and_python_m(store_and_expected, tmp_path):
    store, _ = store_and_expected
    script = Path(sys.executable).parent / "infobatch-stream"
    commands = [[sys.executable, "-m", "infobatch_stream"]]
    if script.exists():  # installed with pip install -e .
        commands.append([str(script)])
    for command in commands:
        done = run_command(command, "inspect", store.url, "--json")
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["next_epoch"]["pruned"] == policy_pruned(store.snapshot(), 0.5)
        # Not a tty: no progress bar, only the duplicates warning.
        assert done.stderr.startswith("WARNING: epoch 2") and done.stderr.count("\n") == 1
        done = run_command(command, "inspect", str(tmp_path / "nowhere"))
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert str(tmp_path / "nowhere") in done.stderr
    done = run_command(commands[-1], "--version")
    assert done.returncode == 0 and "infobatch-stream" in done.stdout


def test_s3_store(s3_server, s3_bucket, cache_dir, tmp_path, capsys):
    url = f"s3://{s3_bucket}/runs/a/scores"
    store, expected = build_store(url, epochs=2, keys_per_epoch=300,
                                  storage_options=s3_server.storage_options, cache_dir=cache_dir)
    options = []
    for key, value in s3_server.storage_options.items():
        options += ["--storage-option", f"{key}={value}"]
    options += ["--cache-dir", cache_dir]
    report, _ = run_json(capsys, "inspect", url, *options)
    assert [row["epoch"] for row in report["epochs"]] == [0, 1]
    check_stats(report, np.array(list(expected[1].values()), np.float32), store.snapshot(), 0.5)
    assert report["pending_deltas"]["files"] == store.pending_deltas(2)

    out = tmp_path / "s3.parquet"
    assert cli.main(["export", url, str(out), *options]) == 0
    assert pq.read_table(out)["score"].to_numpy().tolist() == store.snapshot().scores.tolist()
    # ... and the outputs themselves to the bucket, through the same options
    remote_out = f"s3://{s3_bucket}/reports/latest.parquet"
    assert cli.main(["export", url, remote_out, *options]) == 0
    assert cli.main(["plot", url, f"s3://{s3_bucket}/reports/scores.png", *options]) == 0
    fs = s3_server.filesystem()
    with fs.open(remote_out, "rb") as f:
        assert pq.read_table(f)["score"].to_numpy().tolist() == store.snapshot().scores.tolist()
    assert fs.cat_file(f"s3://{s3_bucket}/reports/scores.png")[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    missing = f"s3://{s3_bucket}/nothing-here"
    assert cli.main(["inspect", missing, *options]) == 2
    assert missing in capsys.readouterr().err
    # A misspelt option or an unreachable endpoint: one line naming the URL, not a traceback.
    assert cli.main(["inspect", url, *options, "--storage-option", "endpoint=x"]) == 2
    err = capsys.readouterr().err
    assert url in err and "endpoint" in err and err.count("\n") == 1
    unreachable = ["--storage-option", f"endpoint_url=http://127.0.0.1:{free_port()}",
                   "--storage-option", 'config_kwargs={"retries": {"max_attempts": 1}}']
    assert cli.main(["inspect", url, *unreachable, "--cache-dir", cache_dir]) == 2
    err = capsys.readouterr().err
    assert url in err and "connect" in err.lower() and err.count("\n") == 1


def test_inspect_shows_deltas_left_in_committed_epochs(tmp_path, capsys):
    store = ScoreStore(str(tmp_path / "scores"))
    with store.writer(0) as writer:
        writer.record(["a"], [1.0])
    store.commit(0)
    with store.writer(0, rank=3) as writer:  # flushed after the commit: never merged
        writer.record(["b"], [2.0])
    report, err = run_json(capsys, "inspect", store.url)
    assert report["leftover_deltas"] == {"0": store.pending_deltas(0)}
    assert "WARNING: epoch 0 is committed but 1 of its delta file(s)" in err
    assert cli.main(["inspect", store.url]) == 0
    assert "left over in committed epoch 0: 1 delta file(s)" in capsys.readouterr().out


def test_inspect_opens_the_newer_epoch_when_its_own_is_retired_meanwhile(tmp_path, capsys,
                                                                         monkeypatch):
    """A live run commits twice (keep_snapshots=1) between inspect's listing and its open: the
    report describes the newer epoch, coherently (it exited 2 on the retired one before)."""
    from infobatch_stream.storage.files import StoreFiles

    store, _ = build_store(tmp_path / "scores", epochs=2, keep_snapshots=1)
    real_read = StoreFiles.read
    staged = []

    def read_then_a_run_commits(self, relpath):
        data = real_read(self, relpath)
        if relpath.startswith("manifests/") and not staged:
            staged.append(relpath)
            for epoch in (2, 3):
                with store.writer(epoch, run_id="run-a") as writer:
                    writer.record(["late"], [float(epoch)])
                store.commit(epoch, run_id="run-a")
        return data

    monkeypatch.setattr(StoreFiles, "read", read_then_a_run_commits)
    report, _ = run_json(capsys, "inspect", store.url)
    assert staged == ["manifests/epoch-00000001.json"]
    assert report["latest_epoch"] == 3 and report["snapshot"]["epoch"] == 3
    assert [row["epoch"] for row in report["epochs"]] == [3]
    assert report["next_epoch"]["epoch"] == 4


def test_inspect_counts_the_next_epoch_with_the_runs_recorded_settings(tmp_path, capsys):
    """The store records the run's settings (begin_run): inspect shows them and counts the
    next epoch with them, without --prune-ratio/--seed; the flags still override."""
    store, _ = build_store(tmp_path / "scores")
    settings = {"policy": "InfoBatchPolicy", "num_epochs": 10, "prune_ratio": 0.3,
                "delta": 0.875, "seed": 7, "key": "__key__"}
    lease = store.begin_run("run-a", settings)
    report, _ = run_json(capsys, "inspect", store.url)
    assert report["run"]["settings"] == settings and report["run"]["incarnation"] == lease.incarnation
    assert report["run"]["run_id"] == "run-a"
    nxt = report["next_epoch"]
    assert (nxt["prune_ratio"], nxt["seed"], nxt["num_epochs"], nxt["delta"]) == (0.3, 7, 10, 0.875)
    assert nxt["pruned"] == policy_pruned(store.snapshot(), 0.3, seed=7) and not nxt["annealing"]
    report, _ = run_json(capsys, "inspect", store.url, "--seed", "1")
    assert report["next_epoch"]["seed"] == 1 and report["next_epoch"]["prune_ratio"] == 0.3
    assert report["next_epoch"]["pruned"] == policy_pruned(store.snapshot(), 0.3, seed=1)
    assert cli.main(["inspect", store.url]) == 0
    out = capsys.readouterr().out
    assert "run run-a, incarnation 1" in out and "prune_ratio=0.3" in out and "seed=7" in out
    # The run's last epochs anneal: nothing is pruned, and inspect says so.
    store.begin_run("run-a", dict(settings, num_epochs=4, delta=0.5), takeover=True)
    report, _ = run_json(capsys, "inspect", store.url)
    assert report["next_epoch"]["annealing"] and report["next_epoch"]["pruned"] == 0

"""The digits classification example's command lines: local and S3, three pruning modes."""

from __future__ import annotations

import json

import infobatch_stream as ibs

from .conftest import run, script

MAKE_SHARDS = script("classification", "make_shards.py")
TRAIN = script("classification", "train.py")


def test_digits_three_modes_locally(tmp_path, example_env):
    lines = run([MAKE_SHARDS, "--out", tmp_path / "shards"], example_env).splitlines()
    train, test = lines[-2], lines[-1]
    assert lines[0] == "wrote 1437 training and 360 test samples"
    summaries = {}
    for mode, flags in {"infobatch": [], "random": ["--policy", "random"],
                        "baseline": ["--no-prune"]}.items():
        out = tmp_path / mode
        log = run([TRAIN, "--shards", train, "--test", test, "--out", out, "--epochs", "3",
                   "--threads", "1", "--batch-size", "64", "--lr", "1e-2", *flags], example_env)
        assert log.splitlines()[-1].startswith(f"{mode} seed 0: test accuracy")
        summaries[mode] = json.loads((out / "summary.json").read_text())
        store = ibs.ScoreStore(str(out / "scores"), cache_dir=example_env["INFOBATCH_STREAM_CACHE"])
        assert store.latest_epoch == 2
    for mode, summary in summaries.items():
        assert summary["test_accuracy"] > 0.8, (mode, summary["test_accuracy"])
        assert summary["dataset_size"] == 1437
    # epoch 1 prunes (annealing starts at floor(0.875 * 3) = 2)
    assert summaries["baseline"]["pruned"] == 0
    for mode in ("infobatch", "random"):
        assert [h["pruned"] > 0 for h in summaries[mode]["history"]] == [False, True, False]
        for h in summaries[mode]["history"]:  # the logged metrics agree with the plan
            assert h["infobatch"]["epoch"] == h["epoch"]
            assert h["infobatch"]["samples_pruned"] == h["pruned"]
            assert h["infobatch"]["samples_trained"] == h["trained"]
    # random pruning drops known samples at InfoBatch's expected rate: a similar budget
    ib, rnd = summaries["infobatch"]["pruned"], summaries["random"]["pruned"]
    assert abs(ib - rnd) < 0.25 * ib


def test_digits_on_s3(s3_bucket, s3_server, s3_env):
    bucket = f"s3://{s3_bucket}"
    lines = run([MAKE_SHARDS, "--out", f"{bucket}/digits"], s3_env).splitlines()
    train, test = lines[-2], lines[-1]
    assert train.startswith(f"{bucket}/digits/train-")
    run([TRAIN, "--shards", train, "--test", test, "--out", f"{bucket}/runs/digits",
         "--epochs", "2", "--threads", "1", "--batch-size", "64"], s3_env)
    fs = s3_server.filesystem()
    summary = json.loads(fs.cat_file(f"{s3_bucket}/runs/digits/summary.json"))
    assert summary["trained"] > 0 and len(summary["history"]) == 2
    store = ibs.ScoreStore(f"{bucket}/runs/digits/scores", s3_server.storage_options,
                           cache_dir=s3_env["INFOBATCH_STREAM_CACHE"])
    assert store.latest_epoch == 1


def test_digits_demo_report(tmp_path, example_env):
    log = run([script("classification", "run_demo.py"), "--workdir", tmp_path / "demo",
               "--seeds", "2", "--epochs", "2"], example_env, timeout=300)
    for mode in ("baseline", "infobatch", "random"):
        assert f"| {mode} |" in log
    assert (tmp_path / "demo" / "report.md").exists()

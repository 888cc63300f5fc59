"""Two different training runs started at the same moment on one store URL (two real
processes, each with its run_id): one owns the store, the other is refused with a message
naming the owner and how to take over (when it begins the run, or at its commit if both
began on the empty store at once), and the store holds only the owner's scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import infobatch_stream as ibs

SCRIPT = str(Path(__file__).with_name("ownership_race.py"))


def test_two_runs_racing_on_one_store(tmp_path) -> None:
    store_url = str(tmp_path / "store")
    sync = tmp_path / "sync"
    sync.mkdir()
    procs = {}
    for run in ("job-a", "job-b"):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs[run] = subprocess.Popen(
            [sys.executable, SCRIPT, store_url, str(sync), str(tmp_path / f"{run}.json"), run, "3"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for run, proc in procs.items():
        output, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"{run}:\n{output}"
    results = {run: json.loads((tmp_path / f"{run}.json").read_text()) for run in procs}

    winners = [r for r in results.values() if r["error"] is None]
    losers = [r for r in results.values() if r["error"] is not None]
    assert len(winners) == 1 and len(losers) == 1, results
    owner, refused = winners[0]["run"], losers[0]
    assert winners[0]["committed"] == [0, 1, 2]
    assert refused["error_type"] in ("OwnershipError", "FencedError") and refused["committed"] == []
    assert f"belongs to run '{owner}'" in refused["error"]
    assert f"this run is '{refused['run']}'" in refused["error"]
    assert "takeover=True" in refused["error"] and f"run_id='{owner}'" in refused["error"]

    store = ibs.ScoreStore(store_url)
    assert [store.manifest(e).run_id for e in store.epochs] == [owner] * len(store.epochs)
    mine = [f"{owner}-{i}" for i in range(8)]
    theirs = [f"{refused['run']}-{i}" for i in range(8)]
    for epoch in store.epochs:  # only the owner's scores, in every retained epoch
        snap = store.snapshot(epoch)
        assert len(snap) == 8 and np.isnan(snap.lookup(theirs)).all()
        assert snap.lookup(mine).tolist() == [float(i + epoch) for i in range(8)]
    assert len(store.manifest(0).deltas) == 1  # the owner's flush, not the other run's
    assert store.leftover_deltas() == {}  # the refused run's deltas were reported and removed

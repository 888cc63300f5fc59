"""A few commits of bench/soak.py, as a fresh process: with retention, nothing leaks (no file
under the store's root that no manifest names, no open file descriptor) and the disk stays
within its bound. The full soak (300 commits on 1M keys) is in docs/soak.md."""

from __future__ import annotations

import json
import subprocess
import sys

from .helpers import REPO, child_env


def test_soak_smoke_leaks_nothing_and_stays_bounded(tmp_path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "soak.py"), "--commits", "8", "--keys", "20000",
         "--keep", "2", "--dir", str(tmp_path), "--out", str(out)],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["lookup_mismatches"] == 0
    assert result["files"]["leftovers"] == [] and result["fds"]["leaked"] == []
    assert result["files"]["final"] == 1 + 2 * 2  # the marker, 2 manifests, 2 snapshots
    assert result["disk_bytes"]["max"] <= result["disk_bytes"]["bound"]
    assert len(result["commit_s"]["all"]) == 8  # timings are reported, never judged here
    assert list(tmp_path.iterdir()) == [out]  # the soak's own temporary store is gone

"""Soak test of the score store: many commits with retention, and what they leave behind.

    python bench/soak.py                       # 300 commits on a 1M-key store (minutes)
    python bench/soak.py --quick               # 40 commits on 100k keys
    python bench/soak.py --commits 6 --keys 20000 --out soak.json

Each epoch records new scores for a random ~50% of the keys (``--update-fraction``), as
uint64 hashes (what a trainer passes back from a batch), flushes them as one delta, commits,
and then reads the new snapshot as a DataLoader worker would and checks 10k random keys
against an in-memory reference. Retention keeps ``--keep`` snapshots.

Measured (one JSON object on stdout, and in ``--out``):

- ``commit_s``: every commit's wall-clock time; the medians of the first and the last 50
  commits (fewer in short runs: a third each), and the least-squares slope in seconds per
  100 commits (``slope_relative``: that slope over the first median). Timings are reported,
  not judged: the machine may be shared.
- disk: the bytes under the store's root after each commit; the maximum is held against a
  bound of (keep + 1) snapshots + one delta + the small files.
- leaks: files under the store's root that no retained manifest names (temporaries, merged
  or late deltas, orphaned snapshots) and this process's open file descriptors
  (/proc/self/fd), both compared before and after the run, after the store objects are
  dropped.

``ok`` is true when every lookup was exact, nothing leaked and the disk stayed bounded.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from infobatch_stream.storage import ScoreStore, layout  # noqa: E402

CHECKED_KEYS = 10_000


def open_fds() -> list[str]:
    """This process's open file descriptors, with what each points at."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass  # the listing's own descriptor, closed meanwhile
    return sorted(out)


def tree(root: str) -> tuple[dict[str, int], int]:
    """({relative path: bytes} of every file under ``root``, bytes allocated on disk)."""
    files, used = {}, 0
    for parent, _, names in os.walk(root):
        for name in names:
            path = os.path.join(parent, name)
            st = os.stat(path)
            files[os.path.relpath(path, root)] = st.st_size
            used += st.st_blocks * 512
    return files, used


def expected_files(store: ScoreStore) -> set[str]:
    manifests = [store.manifest(e) for e in store.epochs]
    return ({layout.MARKER} | {layout.manifest_name(m.epoch) for m in manifests}
            | {m.snapshot for m in manifests})


def window_of(n: int) -> int:
    return max(1, min(50, n // 3))


def slope_per_100(times: list[float]) -> float:
    if len(times) < 2:
        return 0.0
    x = np.arange(len(times), dtype=np.float64)
    return float(np.polyfit(x, np.asarray(times), 1)[0] * 100)


def soak(root: str, commits: int, keys: int, fraction: float, keep: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    hashes = np.unique(rng.integers(0, 2**64 - 1, keys, dtype=np.uint64, endpoint=True))
    reference = np.full(len(hashes), np.nan, np.float32)
    gc.collect()
    fds_before = open_fds()
    store = ScoreStore(root, cache_dir=os.path.join(root + "-cache"), keep_snapshots=keep)
    reader = ScoreStore(root, cache_dir=os.path.join(root + "-cache"), keep_snapshots=keep)
    commit_s, record_s, read_s, disk, counts = [], [], [], [], []
    mismatches = 0
    delta_bytes = snapshot_bytes = 0
    for epoch in range(commits):
        chosen = np.flatnonzero(rng.random(len(hashes)) < fraction)
        scores = rng.gamma(2.0, 1.0, len(chosen)).astype(np.float32)
        started = time.perf_counter()
        with store.writer(epoch) as writer:
            writer.record(hashes[chosen], scores)
        record_s.append(time.perf_counter() - started)
        delta_bytes = max(delta_bytes, sum(os.path.getsize(os.path.join(root, d))
                                           for d in store.pending_deltas(epoch)))
        reference[chosen] = scores
        started = time.perf_counter()
        manifest = store.commit(epoch)
        commit_s.append(time.perf_counter() - started)
        snapshot_bytes = max(snapshot_bytes, manifest.snapshot_bytes)
        started = time.perf_counter()
        snap = reader.snapshot()  # a worker of the next epoch: a fresh listing, a new mapping
        probe = rng.integers(0, len(hashes), CHECKED_KEYS)
        got = snap.lookup(hashes[probe])
        read_s.append(time.perf_counter() - started)
        mismatches += int(np.count_nonzero(~((got == reference[probe])
                                            | (np.isnan(got) & np.isnan(reference[probe])))))
        files, used = tree(root)
        disk.append(used)
        counts.append(len(files))
        del snap
    leftovers = sorted(set(tree(root)[0]) - expected_files(store))
    del store, reader
    gc.collect()
    fds_after = open_fds()
    files, used = tree(root)
    # the store's bound: `keep` snapshots (+1 while a commit writes the next) + a delta + JSON
    bound = (keep + 1) * snapshot_bytes + delta_bytes + 64 * 1024 * (keep + 2)
    w = window_of(commits)
    first, last = float(np.median(commit_s[:w])), float(np.median(commit_s[-w:]))
    slope = slope_per_100(commit_s)
    leaked_fds = sorted(set(fds_after) - set(fds_before))
    return {
        "commits": commits, "keys": len(hashes), "update_fraction": fraction,
        "keep_snapshots": keep,
        "commit_s": {"first_median": first, "last_median": last, "window": w,
                     "slope_per_100_commits": slope,
                     "slope_relative": slope / first if first else None,
                     "min": float(np.min(commit_s)), "max": float(np.max(commit_s)),
                     "all": [round(t, 4) for t in commit_s]},
        "record_flush_s_median": float(np.median(record_s)),
        "reopen_lookup_s_median": float(np.median(read_s)),
        "lookup_mismatches": mismatches,
        "disk_bytes": {"max": int(max(disk)), "final": int(used), "bound": int(bound),
                       "snapshot": int(snapshot_bytes), "delta": int(delta_bytes),
                       "bounded": bool(max(disk) <= bound)},
        "files": {"max": int(max(counts)), "final": len(files), "leftovers": leftovers},
        "fds": {"before": len(fds_before), "after": len(fds_after), "leaked": leaked_fds},
        "ok": bool(mismatches == 0 and not leftovers and not leaked_fds and max(disk) <= bound),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="40 commits on 100k keys")
    parser.add_argument("--commits", type=int)
    parser.add_argument("--keys", type=int)
    parser.add_argument("--update-fraction", type=float, default=0.5)
    parser.add_argument("--keep", type=int, default=3, help="keep_snapshots (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", help="where to put the store (default: a temporary directory)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    commits = args.commits or (40 if args.quick else 300)
    keys = args.keys or (100_000 if args.quick else 1_000_000)
    parent = tempfile.mkdtemp(prefix="ibs-soak-", dir=args.dir)
    started = time.time()
    try:
        result = soak(os.path.join(parent, "scores"), commits, keys, args.update_fraction,
                      args.keep, args.seed)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    result["wall_s"] = round(time.time() - started, 1)
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                         "platform": platform.platform(), "loadavg": os.getloadavg()}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of the score store: record, commit, lookup, and the commit's peak memory.

    python bench/store.py                      # 1M and 10M keys (the default)
    python bench/store.py --quick              # 5M keys only
    python bench/store.py --keys 2000000 --dir /mnt/fast/bench

Prints one JSON object to stdout. For each size N, three fresh processes run on a local store:

1. record: epoch 0 records N key strings (``shard-00042/000420017``, batches of ``--batch``,
   float32 scores) and commits; epoch 1 records new scores for the same keys given as
   precomputed uint64 hashes (as a trainer passes them back from a batch), and flushes.
   Throughput counts the ``record`` calls and the final ``flush`` (the sort that makes a
   delta is paid there, or inside ``record`` whenever ``flush_rows`` rows are buffered);
   ``record_only`` leaves the final flush out.
2. commit: a fresh process commits epoch 1 (N known keys, N updates from the deltas: every
   key's score changes, the steady state of training). Peak memory is measured two ways:
   ``peak_rss_growth`` is VmHWM after the commit minus VmRSS before it (the high-water
   mark is reset first through /proc/self/clear_refs); it counts every page the process
   touches, including the memory-mapped previous snapshot and deltas, which are page cache
   shared with other processes and reclaimable. ``peak_anon_growth`` is the growth of
   RssAnon (private, anonymous memory: what the commit really allocates), sampled every
   ~1 ms by this parent process from /proc/<pid>/status, so it is a lower bound that misses
   only peaks shorter than a sample.
3. lookup: a fresh process opens the snapshot (from the page cache, as a DataLoader worker
   does; ``snapshot_open_s`` times mapping and checking it) and looks up a batch of 1M
   random existing keys (uint64 hashes, and key strings, whose hashing is included), then
   one key per call.

Every timed figure is wall-clock; ``*_per_cpu_s`` and ``commit_cpu_s`` give the same work in
this process's CPU time, which other processes on a shared machine disturb less (the load
average is reported with the results).

Goals (for 10M keys on the 2-core reference machine): record >= 2M keys/s, commit <= 5 s,
peak commit memory <= 32 bytes/key, batched lookup >= 5M keys/s. The RSS figure is held to
the memory goal; the anonymous figure is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

GOALS = {
    "record_str_keys_per_s": (">=", 2_000_000),
    "record_u64_keys_per_s": (">=", 2_000_000),
    "commit_s": ("<=", 5.0),
    "commit_peak_rss_bytes_per_key": ("<=", 32.0),
    "lookup_batched_keys_per_s": (">=", 5_000_000),
}
GOAL_SIZE = 10_000_000
LOOKUP_BATCH = 1_000_000


def key_string(i: int) -> str:
    return f"shard-{i // 10_000:05d}/{i:09d}"


def keys_of(indices) -> list[str]:
    return [key_string(int(i)) for i in indices]


def storage():
    import infobatch_stream.storage as storage_module  # imported here: after sys.path is set

    return storage_module


def status() -> dict[str, int]:
    """This process's memory figures from /proc/self/status, in bytes."""
    out = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[name] = int(value.split()[0]) * 1024
    return out


# -- phases, each run in a fresh process ------------------------------------------------------

def _time_record(store, epoch: int, keys, scores: np.ndarray, batch: int, kind: str) -> dict:
    """Record ``keys`` batch by batch into epoch ``epoch`` and flush: ``record_<kind>_*``."""
    n = len(scores)
    writer = store.writer(epoch, rank=0)
    t0, c0 = time.perf_counter(), time.process_time()
    for s in range(0, n, batch):
        writer.record(keys[s:s + batch], scores[s:s + batch])
    t1 = time.perf_counter()
    writer.flush()
    t2, c2 = time.perf_counter(), time.process_time()
    return {f"record_{kind}_keys_per_s": n / (t2 - t0),
            f"record_{kind}_keys_per_cpu_s": n / (c2 - c0),
            f"record_{kind}_only_keys_per_s": n / (t1 - t0),
            f"record_{kind}_deltas": len(writer.files_written)}


def phase_record(directory: str, n: int, batch: int) -> dict[str, Any]:
    st = storage()
    store = st.ScoreStore(directory, cache_dir=os.path.join(directory, "..", "cache"))
    rng = np.random.default_rng(0)
    keys = keys_of(range(n))
    out = _time_record(store, 0, keys, rng.gamma(2.0, 1.0, n).astype(np.float32), batch, "str")

    t0 = time.perf_counter()
    manifest = store.commit(0)
    out["commit_first_epoch_s"] = time.perf_counter() - t0
    assert manifest.keys == n

    hashes = st.hash_keys(keys)  # what a trainer gets back from a batch: precomputed hashes
    del keys
    out.update(_time_record(store, 1, hashes, rng.gamma(2.0, 1.0, n).astype(np.float32), batch,
                            "u64"))
    return out


def phase_commit(directory: str, n: int) -> dict[str, Any]:
    st = storage()
    store = st.ScoreStore(directory, cache_dir=os.path.join(directory, "..", "cache"))
    assert store.latest_epoch == 0 and store.pending_deltas(1)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current RSS
    before = status()
    print(json.dumps({"ready": before}), flush=True)
    sys.stdin.readline()  # the parent's sampler is running
    t0, c0 = time.perf_counter(), time.process_time()
    manifest = store.commit(1)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    after = status()
    assert manifest.keys == n and manifest.updated == n
    return {"commit_s": elapsed, "commit_cpu_s": cpu, "before": before, "after": after,
            "peak_rss_growth": after["VmHWM"] - before["VmRSS"]}


def phase_lookup(directory: str, n: int, per_key: int) -> dict[str, Any]:
    st = storage()
    store = st.ScoreStore(directory, cache_dir=os.path.join(directory, "..", "cache"))
    snap = store.snapshot()
    rng = np.random.default_rng(1)
    rows = rng.integers(0, len(snap), LOOKUP_BATCH)
    query = snap.hashes[rows].copy()
    expected = snap.scores[rows]
    out: dict[str, Any] = {}
    snap.lookup(query[:1000])  # touch the code paths once

    def best(fn, repeat: int = 3, clock=time.perf_counter) -> float:
        times = []
        for _ in range(repeat):
            t0 = clock()
            fn()
            times.append(clock() - t0)
        return min(times)

    # What every DataLoader worker pays per epoch: map the file and check it (checksum, sorted
    # unique hashes, finite scores, stored sum), page cache warm.
    out["snapshot_open_s"] = best(lambda: st.ScoreSnapshot.open(snap.path, snap.epoch), repeat=5)
    got = snap.lookup(query)
    assert np.array_equal(got, expected)
    out["lookup_batched_keys_per_s"] = LOOKUP_BATCH / best(lambda: snap.lookup(query))
    out["lookup_batched_keys_per_cpu_s"] = LOOKUP_BATCH / best(lambda: snap.lookup(query),
                                                               clock=time.process_time)

    # Key strings of the same rows: invert nothing, rebuild them from the record phase's scheme.
    indices = rng.integers(0, n, LOOKUP_BATCH)
    strings = keys_of(indices)
    assert not np.isnan(snap.lookup(strings[:1000])).any()
    out["lookup_batched_str_keys_per_s"] = LOOKUP_BATCH / best(lambda: snap.lookup(strings))

    one_hash = [query[i:i + 1] for i in range(per_key)]
    one_str = [[s] for s in strings[:per_key]]
    out["lookup_per_key_u64_keys_per_s"] = per_key / best(
        lambda: [snap.lookup(q) for q in one_hash], repeat=2)
    out["lookup_per_key_str_keys_per_s"] = per_key / best(
        lambda: [snap.lookup(q) for q in one_str], repeat=2)
    return out


# -- the parent: one fresh process per phase and size -----------------------------------------

def run_phase(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"phase {args} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_commit_phase(directory: str, n: int) -> dict[str, Any]:
    """The commit phase, with its anonymous memory sampled from outside the process."""
    proc = subprocess.Popen([sys.executable, __file__, "--_phase", "commit", "--_dir", directory,
                             "--_n", str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ready = json.loads(proc.stdout.readline())["ready"]
    samples: list[tuple[int, int]] = []
    done = threading.Event()

    def sample() -> None:
        path = f"/proc/{proc.pid}/status"
        while not done.is_set():
            try:
                with open(path) as handle:
                    text = handle.read()
            except OSError:
                return
            fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
            try:
                samples.append((int(fields["RssAnon"].split()[0]) * 1024,
                                int(fields["RssFile"].split()[0]) * 1024))
            except KeyError:
                return
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"commit phase failed:\n{err}")
    result = json.loads(out.strip().splitlines()[-1])
    peak_anon = max(a for a, _ in samples)
    result["peak_anon_growth"] = peak_anon - ready["RssAnon"]
    result["peak_file_mapped_growth"] = max(f for _, f in samples) - ready["RssFile"]
    result["samples"] = len(samples)
    return result


def bench_size(n: int, batch: int, per_key: int, root: str) -> dict[str, Any]:
    directory = os.path.join(root, f"store-{n}")
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(os.path.join(root, "cache"), exist_ok=True)
    out: dict[str, Any] = {"keys": n, "batch": batch}
    out.update(run_phase(["--_phase", "record", "--_dir", directory, "--_n", str(n),
                          "--batch", str(batch)]))
    commit = run_commit_phase(directory, n)
    out["commit_s"] = commit["commit_s"]
    out["commit_cpu_s"] = commit["commit_cpu_s"]
    out["commit_peak_rss_growth_bytes"] = commit["peak_rss_growth"]
    out["commit_peak_rss_bytes_per_key"] = commit["peak_rss_growth"] / n
    out["commit_peak_anon_growth_bytes"] = commit["peak_anon_growth"]
    out["commit_peak_anon_bytes_per_key"] = commit["peak_anon_growth"] / n
    out["commit_peak_file_mapped_bytes_per_key"] = commit["peak_file_mapped_growth"] / n
    out["commit_memory_samples"] = commit["samples"]
    out.update(run_phase(["--_phase", "lookup", "--_dir", directory, "--_n", str(n),
                          "--per-key", str(per_key)]))
    latest = max(os.listdir(os.path.join(directory, "snapshots")))  # names sort by epoch
    out["snapshot_bytes"] = os.path.getsize(os.path.join(directory, "snapshots", latest))
    shutil.rmtree(directory, ignore_errors=True)
    return out


def judge(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    size = GOAL_SIZE if str(GOAL_SIZE) in results else max(map(int, results))
    measured = results[str(size)]
    verdicts = {}
    for name, (op, goal) in GOALS.items():
        value = measured[name]
        ok = value >= goal if op == ">=" else value <= goal
        verdicts[name] = {"goal": f"{op} {goal}", "measured": value, "pass": ok}
    note = None if size == GOAL_SIZE else f"goals are for {GOAL_SIZE} keys; judged at {size}"
    return {"at_keys": size, "note": note, "verdicts": verdicts,
            "all_pass": all(v["pass"] for v in verdicts.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--quick", action="store_true", help="5M keys only")
    parser.add_argument("--batch", type=int, default=512, help="keys per record() call")
    parser.add_argument("--per-key", type=int, default=100_000, help="one-key lookups to time")
    parser.add_argument("--dir", default=None, help="where to build the stores (default: a temp dir)")
    parser.add_argument("--_phase", help=argparse.SUPPRESS)
    parser.add_argument("--_dir", help=argparse.SUPPRESS)
    parser.add_argument("--_n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._phase:
        if args._phase == "record":
            result = phase_record(args._dir, args._n, args.batch)
        elif args._phase == "commit":
            result = phase_commit(args._dir, args._n)
        else:
            result = phase_lookup(args._dir, args._n, args.per_key)
        print(json.dumps(result))
        return

    sizes = [5_000_000] if args.quick else args.keys
    root = args.dir or tempfile.mkdtemp(prefix="infobatch-bench-")
    import numpy
    import pyarrow

    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(),
                    "python": platform.python_version(), "numpy": numpy.__version__,
                    "pyarrow": pyarrow.__version__, "platform": platform.platform()},
        "results": {},
    }
    try:
        for n in sizes:
            report["results"][str(n)] = bench_size(n, args.batch, args.per_key, root)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    report["goals"] = judge(report["results"])
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    main()

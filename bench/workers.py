"""Memory of DataLoader workers reading one snapshot through the pruning stage.

A store with one committed snapshot of ``--keys`` keys (5M quick, 10M full: 16 bytes a key)
is read by 4 real ``torch.utils.data.DataLoader`` worker processes (fork, as on Linux by
default). Each worker runs ``InfoBatch.stage()`` over its quarter of the keys (the stage
opens the snapshot, which verifies the checksum of every column, so every page of the file
is touched in every worker, and then looks up, draws and weights each sample). Each worker
reads its own ``/proc/self/smaps_rollup`` twice: when it starts iterating, before the stage
has opened the snapshot, and after the last sample. The growth of

- ``Rss`` counts the snapshot's file pages the worker mapped (shared with every other
  process through the page cache: the file is memory-mapped, never read into a buffer);
- ``Private_Clean + Private_Dirty`` (the USS) is the memory that exists only for this
  worker: what a copy of the snapshot per worker would show. **This is the goal's measure**
  (growth per worker <= 5% of the snapshot file).

A control pass (the same workers and samples, the stage replaced by an identity stage) gives
the growth that iterating costs without any snapshot (Python's allocator keeps freed arenas);
it is reported beside, not subtracted from, the goal's figure.

    python bench/workers.py [--quick] [--keys N] [--workers 4]    # prints JSON
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds

import infobatch_stream as ibs

WORKERS = 4
KEY_FORMAT = "{:010d}"


def smaps_rollup(pid: int | str = "self") -> dict[str, int]:
    """The fields of /proc/<pid>/smaps_rollup, in bytes."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def _memory() -> dict[str, int]:
    """This process's memory, in bytes: totals, and private pages by kind of mapping.

    Private pages of the snapshot file (``snapshot_private``) would mean a per-worker copy of
    its pages; heap and anonymous mappings hold what the worker allocated (and the pages of
    its parent it wrote to after the fork, copy-on-write).
    """
    fields = smaps_rollup()
    out = {"rss": fields["Rss"], "pss": fields.get("Pss", 0),
           "private": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
           "anonymous": fields.get("Anonymous", 0),
           "snapshot_rss": 0, "snapshot_private": 0, "heap_anon_private": 0}
    kind = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            parts = line.split()
            if parts and not parts[0].endswith(":"):  # a mapping's header line
                path = parts[5] if len(parts) > 5 else ""
                kind = ("snapshot" if "/snapshots/" in path else
                        "heap_anon" if path in ("", "[heap]") else None)
            elif kind == "snapshot" and parts[0] == "Rss:":
                out["snapshot_rss"] += int(parts[1]) * 1024
            elif kind is not None and parts[0] in ("Private_Clean:", "Private_Dirty:"):
                out[f"{kind}_private"] += int(parts[1]) * 1024
    return out


def _samples(ranges: Iterator[dict]) -> Iterator[dict]:
    """Raw samples (``__key__`` and a few payload bytes, as after the tar reader) of key ranges."""
    for spec in ranges:
        for i in range(spec["start"], spec["stop"]):
            yield {"__key__": KEY_FORMAT.format(i), "__url__": spec["url"], "jpg": b"x"}


class StageReader(torch.utils.data.IterableDataset):
    """Each worker: memory before, every sample of its share through ``stage``, memory after.

    Yields one small dict per worker (its pid, counts and memory), not the samples: what the
    samples cost downstream is not what is measured here.
    """

    def __init__(self, keys: int, parts: int, stage: Any, barrier: Any):
        super().__init__()
        self.barrier = barrier
        step = -(-keys // parts)
        self.ranges = [{"url": f"part-{p}", "start": p * step, "stop": min(keys, (p + 1) * step)}
                       for p in range(parts)]
        self.stage = stage

    def __iter__(self):
        before = _memory()
        start = time.perf_counter()
        pipeline = wds.DataPipeline(wds.SimpleShardList([r["url"] for r in self.ranges]),
                                    wds.split_by_worker, self._expand, self.stage)
        self._read = 0
        kept = sum(1 for _ in pipeline)  # the stage yields the samples it keeps
        samples = self._read
        seconds = time.perf_counter() - start
        # Every worker measures while all of them still map the snapshot: a page is counted
        # private when one process alone maps it, which says nothing of copies if the others
        # have merely finished earlier.
        self.barrier.wait()
        after = _memory()
        self.barrier.wait()
        yield {"pid": os.getpid(), "samples": samples, "kept": int(kept), "seconds": seconds,
               "before": before, "after": after}

    def _expand(self, shards: Iterator[dict]) -> Iterator[dict]:
        by_url = {r["url"]: r for r in self.ranges}
        for sample in _samples(by_url[s["url"]] for s in shards):
            self._read += 1
            yield sample


def _identity(samples):
    return samples


def _read(keys: int, workers: int, stage: Any) -> list[dict]:
    context = multiprocessing.get_context("fork")
    dataset = StageReader(keys, workers * 4, stage, context.Barrier(workers))
    with warnings.catch_warnings():  # 4 workers on a 2-core machine: slower, not wrong
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                             multiprocessing_context=context)
        return list(loader)


def make_store(root: str, keys: int) -> tuple[str, int]:
    """A store whose epoch 0 holds ``keys`` keys with right-skewed scores; (url, file bytes)."""
    store = ibs.ScoreStore(root)
    rng = np.random.default_rng(0)
    with store.writer(0) as writer:
        chunk = 1 << 20
        for start in range(0, keys, chunk):
            stop = min(keys, start + chunk)
            names = [KEY_FORMAT.format(i) for i in range(start, stop)]
            writer.record(names, rng.lognormal(0.0, 1.0, stop - start))
            writer.flush()
    manifest = store.commit(0)
    return root, manifest.snapshot_bytes


def run(keys: int, workers: int = WORKERS, workdir: str | None = None) -> dict[str, Any]:
    root = tempfile.mkdtemp(prefix="ibs-workers-", dir=workdir)
    try:
        url, snapshot_bytes = make_store(os.path.join(root, "scores"), keys)
        # A fresh InfoBatch: nothing of the snapshot is open in the parent before the fork.
        ib = ibs.InfoBatch(url, num_epochs=10)
        control = _read(keys, workers, _identity)
        staged = _read(keys, workers, ib.stage())
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def growth(reports: list[dict], field: str) -> list[int]:
        return [r["after"][field] - r["before"][field] for r in reports]

    private = growth(staged, "private")
    result = {
        "keys": keys, "workers": workers, "snapshot_bytes": snapshot_bytes,
        "samples": sum(r["samples"] for r in staged), "kept": sum(r["kept"] for r in staged),
        "control_samples": sum(r["samples"] for r in control),
        "private_growth_per_worker_bytes": statistics.median(private),
        "private_growth_max_bytes": max(private),
        "rss_growth_per_worker_bytes": statistics.median(growth(staged, "rss")),
        "pss_growth_per_worker_bytes": statistics.median(growth(staged, "pss")),
        "snapshot_rss_per_worker_bytes": statistics.median(r["after"]["snapshot_rss"] for r in staged),
        "snapshot_private_per_worker_bytes": statistics.median(
            r["after"]["snapshot_private"] for r in staged),
        "heap_anon_private_growth_per_worker_bytes": statistics.median(
            growth(staged, "heap_anon_private")),
        "control_private_growth_per_worker_bytes": statistics.median(growth(control, "private")),
        "control_rss_growth_per_worker_bytes": statistics.median(growth(control, "rss")),
        "stage_samples_per_s_per_worker": statistics.median(
            r["samples"] / r["seconds"] for r in staged),
        "per_worker": [{"samples": r["samples"], "before": r["before"], "after": r["after"]}
                       for r in staged],
        "measure": "private = Private_Clean + Private_Dirty of /proc/<pid>/smaps_rollup (USS), "
                   "after - before, measured while all workers map the snapshot",
    }
    result["private_growth_fraction"] = result["private_growth_per_worker_bytes"] / snapshot_bytes
    result["private_growth_max_fraction"] = result["private_growth_max_bytes"] / snapshot_bytes
    result["rss_growth_fraction"] = result["rss_growth_per_worker_bytes"] / snapshot_bytes
    result["net_private_growth_fraction"] = (result["private_growth_per_worker_bytes"]
                                             - result["control_private_growth_per_worker_bytes"]
                                             ) / snapshot_bytes
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5M keys, not 10M")
    parser.add_argument("--keys", type=int, default=None)
    parser.add_argument("--workers", type=int, default=WORKERS)
    args = parser.parse_args(argv)
    keys = args.keys or (5_000_000 if args.quick else 10_000_000)
    json.dump(run(keys, args.workers), sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()

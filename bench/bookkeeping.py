"""Bookkeeping that blocks the training loop, per epoch: ours against the official InfoBatch's.

At ImageNet-1K scale (N = 1,281,167 keys, batch 256) each epoch of each variant is timed in
three parts, all of them work the training process does while the GPU would wait:

- ``update``: one call per batch recording every kept sample's loss and returning the
  weighted mean. Ours is ``InfoBatch.update(loss, keys, weights)`` with the batch's keys as
  the trainer gets them from the DataLoader: a list of ``__key__`` strings such as
  ``"n01440764_10026"`` (variant ``str``), or the stage's ``__key_hash__`` int64 tensor
  (variant ``hash``); ``weights`` is the stage's collated ``__weight__`` (float64 tensor).
  Each batch's tensors are made (``torch.from_numpy``) and its strings unpickled just
  before its call, outside the timing, as a batch arrives from a DataLoader worker;
- ``commit``: ours only, ``InfoBatch.end_epoch()`` (flush the deltas, merge the snapshot,
  write it and its manifest, on a local store on disk);
- ``plan``: the planning of the coming epoch. Ours: ``InfoBatch.plan(N)`` (opens and verifies
  the new snapshot, counts exactly what the epoch keeps). The official code's equivalent is
  its ``IBSampler.reset()``: ``np.random.seed(epoch)`` and ``InfoBatch.prune()``.

The reference (``OfficialBookkeeping``) re-implements the official map-style InfoBatch
(github.com/NUS-HPC-AI-Lab/InfoBatch, infobatch/infobatch.py) line for line, single process:
scores are a float32 torch tensor initialised to 3, ``update`` gathers the batch's weights by
index, scatters the losses into the scores (``scores[indices] = losses``), multiplies in
place and takes the mean; ``prune`` takes the mean, ``well_learned = scores < mean``, keeps an
exact ``int(keep_ratio * len)`` of them with ``np.random.choice(..., replace=False)``, resets
the weights tensor, sets the kept ones to ``1/keep_ratio``, builds the kept index list (a
Python list: the at-or-above-mean indices ``.tolist()`` extended with the chosen ones) and
shuffles it with ``np.random.shuffle``. What the official sampler then costs per sample
(``IBSampler.__next__``, a Python call per index, pulled by the BatchSampler in the training
process) is timed apart as ``reference_sampler_s`` and is NOT in ``reference_s``.

A fourth variant, ``ours_overlap`` (``__key__`` strings), ends each epoch as a GPU job
would, with ``end_epoch(wait=False)``, then a simulated evaluation of ``--eval-s`` seconds
(default 2: a sleep, since on a GPU machine evaluation keeps the GPU busy and leaves the CPU
to the commit's thread), then ``ib.metrics()``, which waits for whatever of the commit is
left. Only the time the training loop is blocked counts: ``update``, ``commit`` (here: the
call to ``end_epoch(wait=False)``), ``wait`` (what ``metrics()`` still waited) and ``plan``;
the evaluation does not, nor does the commit running beside it (``overlap_commit_s``, its
own length, from ``metrics()["commit_seconds"]``). ``ratio_blocking`` is its total over the
reference's, beside ``ratio`` (the same loop with ``end_epoch()`` blocking for the commit).

The variants run interleaved, epoch by epoch, in a rotating order, each with its own losses
(a fresh right-skewed draw per epoch, the same for all variants). Epoch 0 (nothing known yet,
nothing pruned) warms up and is not in the medians; the medians are over the pruning epochs.
Times are wall clock (what blocks the loop, the commit's fsyncs included); the process's CPU
time is reported beside (``*_cpu_s``, ``ratio_cpu``), being less disturbed by other tenants.

    python bench/bookkeeping.py [--quick] [--n N] [--epochs E] [--eval-s S]   # prints JSON
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import shutil
import statistics
import sys
import tempfile
import time
from itertools import islice
from typing import Any

import numpy as np
import torch

import infobatch_stream as ibs

IMAGENET_TRAIN = 1_281_167
BATCH = 256
EVAL_S = 2.0


def imagenet_keys(n: int, seed: int = 0) -> list[str]:
    """ImageNet-style sample keys: ``n<8-digit synset>_<image number>``, 1000 classes."""
    rng = np.random.default_rng(seed)
    synsets = rng.choice(10**8, 1000, replace=False)
    image = rng.permutation(n) + 1
    return [f"n{synsets[i % 1000]:08d}_{image[i]}" for i in range(n)]


def epoch_losses(n: int, epoch: int, seed: int = 0) -> np.ndarray:
    """Per-sample losses of one epoch: right-skewed (log-normal) like real training losses."""
    rng = np.random.default_rng([seed, epoch])
    return (rng.lognormal(0.0, 1.0, n) / (1.0 + 0.3 * epoch)).astype(np.float32)


class OfficialBookkeeping:
    """The official InfoBatch's bookkeeping (``InfoBatch`` + ``IBSampler``), single process.

    Kept line for line with infobatch/infobatch.py: ``update`` is ``InfoBatch.update`` with
    ``self.cur_batch_index`` set as its patched DataLoader iterator sets it, ``prune`` is
    ``InfoBatch.prune``, ``reset`` is ``IBSampler.reset`` (which reseeds numpy's global RNG).
    """

    def __init__(self, size: int, num_epochs: int, prune_ratio: float = 0.5, delta: float = 0.875):
        self.size = size
        self.keep_ratio = min(1.0, max(1e-1, 1.0 - prune_ratio))
        self.num_epochs = num_epochs
        self.delta = delta
        self.scores = torch.ones(size) * 3
        self.weights = torch.ones(size)
        self.num_pruned_samples = 0
        self.cur_batch_index = None
        self.iterations = 0
        self.sample_indices: list[int] = []

    def update(self, values: torch.Tensor) -> torch.Tensor:
        batch_size = values.shape[0]
        assert len(self.cur_batch_index) == batch_size, "not enough index"
        device = values.device
        weights = self.weights[self.cur_batch_index].to(device)
        indices = self.cur_batch_index.to(device)
        loss_val = values.detach().clone()
        self.cur_batch_index = []
        self.scores[indices.cpu().long()] = loss_val.cpu()
        values.mul_(weights)
        return values.mean()

    def prune(self) -> list[int]:
        well_learned_mask = (self.scores < self.scores.mean()).numpy()
        well_learned_indices = np.where(well_learned_mask)[0]
        remained_indices = np.where(~well_learned_mask)[0].tolist()
        selected_indices = np.random.choice(well_learned_indices, int(
            self.keep_ratio * len(well_learned_indices)), replace=False)
        self.weights[:] = 1
        if len(selected_indices) > 0:
            self.weights[selected_indices] = 1 / self.keep_ratio
            remained_indices.extend(selected_indices)
        self.num_pruned_samples += self.size - len(remained_indices)
        np.random.shuffle(remained_indices)
        return remained_indices

    def no_prune(self) -> list[int]:
        samples_indices = list(range(self.size))
        np.random.shuffle(samples_indices)
        return samples_indices

    def reset(self) -> None:
        """``IBSampler.reset``: what runs when the DataLoader starts an epoch."""
        np.random.seed(self.iterations)
        stop_prune = self.num_epochs * self.delta
        if self.iterations > stop_prune:
            if self.iterations == stop_prune + 1:
                self.weights[:] = 1
            self.sample_indices = self.no_prune()
        else:
            self.sample_indices = self.prune()
        self.iter_obj = iter(self.sample_indices)
        self.iterations += 1

    def __next__(self) -> int:
        return next(self.iter_obj)

    def __iter__(self):
        return self


def _official_batches(sampler: OfficialBookkeeping, batch_size: int) -> list[list[int]]:
    """What torch's BatchSampler (drop_last=True) pulls from the official sampler."""
    out = []
    while True:
        batch = [*islice(sampler, batch_size)]
        if len(batch) < batch_size:
            return out
        out.append(batch)


def _run_reference(ref: OfficialBookkeeping, losses: np.ndarray) -> dict[str, Any]:
    cpu = time.process_time()
    start = time.perf_counter()
    ref.reset()
    plan_s = time.perf_counter() - start
    cpu_s = time.process_time() - cpu
    start = time.perf_counter()
    index_batches = _official_batches(ref, BATCH)
    sampler_s = time.perf_counter() - start
    batches = [(np.array(b), losses[b]) for b in index_batches]
    update_s = 0.0
    for index_np, loss_np in batches:
        # untimed: collated as the DataLoader would, the index tensor and the batch's losses
        index, loss = torch.from_numpy(index_np), torch.from_numpy(loss_np)
        cpu = time.process_time()
        start = time.perf_counter()
        ref.cur_batch_index = index
        ref.update(loss)
        update_s += time.perf_counter() - start
        cpu_s += time.process_time() - cpu
    return {"update_s": update_s, "commit_s": 0.0, "plan_s": plan_s, "cpu_s": cpu_s,
            "sampler_s": sampler_s,
            "batches": len(batches), "samples": len(batches) * BATCH}


def _ours_batches(ib: ibs.InfoBatch, keys: list[str], hashes: np.ndarray, losses: np.ndarray,
                  key_kind: str, epoch: int) -> list[tuple]:
    """The batches the stage would hand the trainer this epoch (untimed): kept samples only,
    shuffled, with their ``__key__`` strings or ``__key_hash__`` values and ``__weight__``.

    Key strings are pickled, as a DataLoader worker sends them, and unpickled just before
    their update, so they are fresh in the cache as in a real loop (hashing strings picked at
    random from the 1.28M-key list would cost 4x more, in cache misses alone).
    """
    snapshot = ib.store.snapshot() if ib.store.latest_epoch is not None else ibs.ScoreSnapshot.empty()
    rule = ib.policy.rule(epoch, snapshot)
    weights = rule.weights(hashes, snapshot.lookup(hashes))
    kept = np.flatnonzero(weights)
    np.random.default_rng(epoch).shuffle(kept)
    signed = hashes.view(np.int64)
    out = []
    for start in range(0, len(kept) - BATCH + 1, BATCH):
        rows = kept[start:start + BATCH]
        batch_keys = pickle.dumps([keys[i] for i in rows]) if key_kind == "str" else signed[rows]
        out.append((losses[rows], batch_keys, weights[rows].astype(np.float64)))
    return out


def _run_ours(ib: ibs.InfoBatch, keys: list[str], hashes: np.ndarray, losses: np.ndarray,
              key_kind: str, size: int, eval_s: float | None = None) -> dict[str, Any]:
    """One epoch of ours; ``eval_s``: end it overlapped, with that long an evaluation."""
    cpu = time.process_time()
    start = time.perf_counter()
    plan = ib.plan(size)
    plan_s = time.perf_counter() - start
    cpu_s = time.process_time() - cpu
    batches = _ours_batches(ib, keys, hashes, losses, key_kind, plan.epoch)
    update_s = 0.0
    for loss_np, keys_data, weights_np in batches:
        # untimed, as for the reference: the batch as the DataLoader collates it
        loss, weights = torch.from_numpy(loss_np), torch.from_numpy(weights_np)
        batch_keys = pickle.loads(keys_data) if isinstance(keys_data, bytes) else torch.from_numpy(keys_data)
        cpu = time.process_time()
        start = time.perf_counter()
        ib.update(loss, batch_keys, weights)
        update_s += time.perf_counter() - start
        cpu_s += time.process_time() - cpu
    cpu = time.process_time()
    start = time.perf_counter()
    ib.end_epoch(wait=eval_s is None)
    commit_s = time.perf_counter() - start
    cpu_s += time.process_time() - cpu
    entry = {"update_s": update_s, "commit_s": commit_s, "plan_s": plan_s, "wait_s": 0.0,
             "batches": len(batches), "samples": len(batches) * BATCH,
             "planned_samples": plan.samples}
    if eval_s is not None:
        time.sleep(eval_s)  # evaluation on the GPU: the training process's CPU is idle
        cpu = time.process_time()
        start = time.perf_counter()
        metrics = ib.metrics()
        entry["wait_s"] = time.perf_counter() - start
        cpu_s += time.process_time() - cpu
        entry["overlap_commit_s"] = metrics["commit_seconds"]
        entry["library_blocking_s"] = metrics["blocking_seconds"]
    entry["cpu_s"] = cpu_s
    return entry


def _total(entry: dict[str, Any]) -> float:
    return entry["update_s"] + entry["commit_s"] + entry.get("wait_s", 0.0) + entry["plan_s"]


def run(size: int = IMAGENET_TRAIN, epochs: int = 4, num_epochs: int = 100,
        workdir: str | None = None, eval_s: float = EVAL_S) -> dict[str, Any]:
    """Time ``epochs`` epochs (the first a warm-up) of each variant, interleaved."""
    keys = imagenet_keys(size)
    hashes = ibs.hash_keys(keys)
    root = tempfile.mkdtemp(prefix="ibs-bookkeeping-", dir=workdir)
    try:
        ours = {kind: ibs.InfoBatch(os.path.join(root, kind), num_epochs=num_epochs)
                for kind in ("str", "hash", "overlap")}
        reference = OfficialBookkeeping(size, num_epochs)
        variants = ["ours_str", "ours_hash", "ours_overlap", "reference"]
        per_epoch: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for epoch in range(epochs):
            losses = epoch_losses(size, epoch)
            turn = epoch % len(variants)
            order = variants[turn:] + variants[:turn]  # rotate who runs first
            for variant in order:
                if variant == "reference":
                    entry = _run_reference(reference, losses)
                elif variant == "ours_overlap":
                    entry = _run_ours(ours["overlap"], keys, hashes, losses, "str", size, eval_s)
                else:
                    kind = variant.split("_")[1]
                    entry = _run_ours(ours[kind], keys, hashes, losses, kind, size)
                entry["epoch"] = epoch
                entry["total_s"] = _total(entry)
                per_epoch[variant].append(entry)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def median(variant: str, field: str) -> float:
        return statistics.median(e[field] for e in per_epoch[variant][1:])

    result: dict[str, Any] = {
        "n": size, "batch_size": BATCH, "measured_epochs": list(range(1, epochs)),
        "store": "local disk (tempfile)", "eval_s": eval_s,
    }
    for variant in variants:
        result[f"{variant}_s"] = median(variant, "total_s")
        result[f"{variant}_breakdown"] = {
            f: median(variant, f) for f in ("update_s", "commit_s", "plan_s", "samples")}
        result[f"{variant}_cpu_s"] = median(variant, "cpu_s")
    result["ours_overlap_breakdown"]["wait_s"] = median("ours_overlap", "wait_s")
    result["overlap_commit_s"] = median("ours_overlap", "overlap_commit_s")
    result["overlap_library_blocking_s"] = median("ours_overlap", "library_blocking_s")
    result["ours_s"] = result["ours_str_s"]
    result["reference_sampler_s"] = median("reference", "sampler_s")
    result["ratio"] = result["ours_str_s"] / result["reference_s"]
    result["ratio_hash"] = result["ours_hash_s"] / result["reference_s"]
    # Only the time the training loop is blocked: the commit overlapped the evaluation.
    result["ratio_blocking"] = result["ours_overlap_s"] / result["reference_s"]
    result["ratio_with_sampler"] = result["ours_str_s"] / (
        result["reference_s"] + result["reference_sampler_s"])
    # The same on the process's CPU time: less noisy on a shared machine, blind to I/O waits
    # (the commit's fsyncs), so the wall-clock ratio is the measure.
    result["ratio_cpu"] = result["ours_str_cpu_s"] / result["reference_cpu_s"]
    result["ratio_hash_cpu"] = result["ours_hash_cpu_s"] / result["reference_cpu_s"]
    result["ratio_blocking_cpu"] = result["ours_overlap_cpu_s"] / result["reference_cpu_s"]
    result["epochs"] = per_epoch
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 measured epochs, not 6")
    parser.add_argument("--n", type=int, default=IMAGENET_TRAIN, help="keys (default ImageNet-1K)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs incl. the warm-up")
    parser.add_argument("--eval-s", type=float, default=EVAL_S,
                        help="the simulated evaluation the overlapped commit runs beside")
    args = parser.parse_args(argv)
    epochs = args.epochs or (4 if args.quick else 7)
    result = run(args.n, epochs, eval_s=args.eval_s)
    result["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                         "numpy": np.__version__, "cpus": os.cpu_count(),
                         "torch_threads": torch.get_num_threads()}
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()

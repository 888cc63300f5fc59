"""Is it lossless? A small CNN on scikit-learn's digits, through tar shards, the stage and update.

Every run reads the same webdataset tar shards of the training split (one sample per image:
``__key__`` and ``u8`` = the label byte and the 8x8 uint8 pixels) through
``InfoBatch.stage()``, a full shuffle buffer, decode and batching, and trains with
``InfoBatch.update(per-sample loss, keys, weights)``; each epoch ends with the store's commit.
Three arms, each over the same seeds (the seed sets the model's initialisation, the shuffle
and the pruning draws, so the arms see the same random numbers where they can):

- ``full``: all data every epoch (the same pipeline with ``prune_ratio=0``: the stage keeps
  everything with weight 1);
- ``infobatch``: ``prune_ratio=0.5``, ``delta=0.875`` (the paper's defaults);
- ``random``: ``policy="random"``, the same settings: every known sample is dropped with
  probability ``r * P(score < mean)``, InfoBatch's expected budget, with weight 1.

The learning rate follows a cosine over epochs (not steps), so a pruned epoch does not
shorten the schedule. ``samples_saved`` is measured (samples trained, over the whole run,
against ``epochs x train size``); ``theory_saved`` adds up, before each epoch,
``InfoBatch.plan(train size).expected_saved_fraction`` (``r x P(score < mean)``, 0 in the
first and the annealing epochs) over the same denominator.

    python bench/lossless.py [--quick] [--seeds S] [--epochs E]    # prints JSON
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch import nn

import infobatch_stream as ibs

ARMS = {
    "full": {"prune_ratio": 0.0},
    "infobatch": {"prune_ratio": 0.5, "delta": 0.875},
    "random": {"prune_ratio": 0.5, "delta": 0.875, "policy": "random"},
}
BATCH = 32
LR = 0.05
SHARDS = 4


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 digits, a fixed stratified 80/20 split: (x_train, y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.uint8)  # values 0..16
    return tuple(train_test_split(images, digits.target, test_size=0.2, random_state=seed,
                                  stratify=digits.target))


def write_shards(directory: str, images: np.ndarray, labels: np.ndarray) -> list[str]:
    """The training split as ``SHARDS`` tar shards; returns their paths."""
    paths = [os.path.join(directory, f"digits-{s:02d}.tar") for s in range(SHARDS)]
    for s, path in enumerate(paths):
        # One member per sample, ustar headers (a float mtime would add a pax header to
        # each): Python's tarfile parses ~100K headers a second, and this data set is tiny.
        with wds.TarWriter(path, mtime=0, format=tarfile.USTAR_FORMAT) as sink:
            for i in range(s, len(images), SHARDS):
                sink.write({"__key__": f"digit-{i:05d}",
                            "u8": bytes([int(labels[i])]) + images[i].tobytes()})
    return paths


def _decode(sample: dict) -> tuple:
    raw = np.frombuffer(sample["u8"], np.uint8)
    return (torch.from_numpy(raw[1:].astype(np.float32).reshape(1, 8, 8) / 16.0), int(raw[0]),
            sample["__key__"], sample["__weight__"])


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def _loader(shards: list[str], ib: ibs.InfoBatch, seed: int, epoch: int) -> wds.DataPipeline:
    rng = random.Random(seed * 100_003 + epoch)
    return wds.DataPipeline(
        wds.SimpleShardList(shards), wds.tarfile_to_samples(), ib.stage(),
        wds.shuffle(4096, initial=4096, rng=rng), wds.map(_decode),
        wds.batched(BATCH, collation_fn=torch.utils.data.default_collate),
    )


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = (model(images).argmax(1) == labels).sum().item()
    model.train()
    return correct / len(labels)


def train_arm(arm: str, seed: int, epochs: int, shards: list[str], size: int,
              test: tuple[torch.Tensor, torch.Tensor], root: str) -> dict[str, Any]:
    """One training run; returns its accuracy, the samples it trained and what planning expected."""
    settings = dict(ARMS[arm])
    ib = ibs.InfoBatch(os.path.join(root, f"{arm}-{seed}"), num_epochs=epochs, seed=seed,
                       **settings)
    torch.manual_seed(seed)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    samples, expected, curve = [], [], []
    start = time.perf_counter()
    for epoch in ib.epochs():
        plan = ib.plan(size)
        expected.append(plan.expected_saved_fraction * size)
        trained = 0
        for images, labels, keys, weights in ib.bound(_loader(shards, ib, seed, epoch)):
            loss = nn.functional.cross_entropy(model(images), labels, reduction="none")
            ib.update(loss, keys, weights).backward()
            opt.step()
            opt.zero_grad()
            trained += len(keys)
        sched.step()
        samples.append(trained)
        curve.append(_accuracy(model, *test))
    wall = time.perf_counter() - start
    return {"accuracy": curve[-1], "curve": curve, "samples": samples, "expected_saved": expected,
            "wall_s": wall}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run(seeds: int, epochs: int, workdir: str | None = None) -> dict[str, Any]:
    x_train, x_test, y_train, y_test = digits_split()
    test = (torch.from_numpy(x_test.astype(np.float32)[:, None] / 16.0), torch.from_numpy(y_test))
    root = tempfile.mkdtemp(prefix="ibs-lossless-", dir=workdir)
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    threads = torch.get_num_threads()
    # A tiny model: intra-op threads cost more than they give (far more on a shared machine).
    torch.set_num_threads(1)
    try:
        shards = write_shards(root, x_train, y_train)
        arms = list(ARMS)
        for seed in range(seeds):
            for arm in arms[seed % 3:] + arms[:seed % 3]:  # rotate the order: fair wall times
                runs[arm].append(train_arm(arm, seed, epochs, shards, len(x_train), test, root))
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(root, ignore_errors=True)

    size = len(x_train)
    passes = epochs * size
    result: dict[str, Any] = {
        "dataset": "sklearn load_digits 8x8, stratified 80/20 split",
        "train_size": size, "test_size": len(x_test), "seeds": seeds, "epochs": epochs,
        "batch_size": BATCH, "model": "CNN conv16-conv32-pool-fc64-fc10",
        "optimizer": f"SGD lr {LR} momentum 0.9 wd 5e-4, cosine over epochs",
        "torch_threads": 1,
        "prune_ratio": 0.5, "delta": 0.875,
        "annealing_start": ibs.annealing_start(epochs, 0.875),
    }
    for arm, arm_runs in runs.items():
        mean, std = _mean_std([r["accuracy"] for r in arm_runs])
        result[f"{arm}_acc_mean"], result[f"{arm}_acc_std"] = mean, std
        result[f"{arm}_accs"] = [r["accuracy"] for r in arm_runs]
        result[f"{arm}_wall_s"] = statistics.median(r["wall_s"] for r in arm_runs)
        result[f"{arm}_samples_saved"] = 1.0 - statistics.fmean(sum(r["samples"]) for r in arm_runs) / passes
        curves = zip(*(r["curve"] for r in arm_runs), strict=True)
        result[f"{arm}_curve_mean"] = [statistics.fmean(c) for c in curves]
        per_epoch = zip(*(r["samples"] for r in arm_runs), strict=True)
        result[f"{arm}_samples_per_epoch"] = [statistics.fmean(s) for s in per_epoch]
    result["samples_saved"] = result["infobatch_samples_saved"]
    result["theory_saved"] = statistics.fmean(sum(r["expected_saved"]) for r in runs["infobatch"]) / passes
    result["random_theory_saved"] = statistics.fmean(
        sum(r["expected_saved"]) for r in runs["random"]) / passes
    result["wall_saved"] = 1.0 - result["infobatch_wall_s"] / result["full_wall_s"]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds x 20 epochs, not 5 x 24")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args(argv)
    seeds = args.seeds or (3 if args.quick else 5)
    epochs = args.epochs or (20 if args.quick else 24)
    json.dump(run(seeds, epochs), sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()

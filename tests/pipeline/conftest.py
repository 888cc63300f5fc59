"""Shards and a runner for the training script the pipeline tests drive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

TRAINER = str(Path(__file__).with_name("trainer.py"))


def write_shards(directory: Path, sizes: list[int], seed: int = 0) -> list[str]:
    """Tar shards of (x.npy, y.cls) samples, ``sizes[i]`` samples in shard i; keys unique."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=8)
    directory.mkdir(parents=True, exist_ok=True)
    paths, index = [], 0
    for shard, size in enumerate(sizes):
        path = directory / f"shard-{shard:04d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for _ in range(size):
                x = rng.normal(size=8).astype(np.float32)
                noisy = x @ w + rng.normal(scale=1.0)  # label noise: losses stay spread out
                sink.write({"__key__": f"sample{index:06d}", "x.npy": x, "y.cls": int(noisy > 0)})
                index += 1
        paths.append(str(path))
    return paths


@pytest.fixture
def run_trainer():
    """Run the training script; returns (returncode, out dir reader)."""

    def run(args: list[str], *, env: dict | None = None, torchrun: int = 0, timeout: int = 240):
        cmd = [sys.executable, TRAINER] if not torchrun else [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={torchrun}", TRAINER]
        full_env = dict(os.environ, **(env or {}), OMP_NUM_THREADS="1")
        return subprocess.run(cmd + args, env=full_env, capture_output=True, text=True,
                              timeout=timeout)

    return run


def read_epochs(out: Path) -> dict[tuple[int, int], dict]:
    """{(rank, epoch): log} of every epoch log the training script wrote."""
    logs = {}
    for path in out.glob("rank*-epoch*.json"):
        rank, epoch = path.stem.removeprefix("rank").split("-epoch")
        logs[(int(rank), int(epoch))] = json.loads(path.read_text())
    return logs

"""The integrations' tests: the examples run unchanged under ``probe.py``, on tiny digits shards.

A crash SIGKILLs all of a job's processes at once, and nothing of a job outlives its test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import infobatch_stream as ibs

from .processes import family, kill_all

ROOT = Path(__file__).resolve().parents[2]
PROBE = str(Path(__file__).with_name("probe.py"))
SHARDS = 4  # of 120 samples: 2 per rank


def example(*parts: str) -> str:
    return str(ROOT / "examples" / Path(*parts))


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    """The shard pattern of 480 digits (4 shards of 120), written once per test module."""
    spec = importlib.util.spec_from_file_location(
        "make_digit_shards", example("classification", "make_shards.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("digits")
    module.write_digits(str(out), shard_size=120)
    return f"{out}/train-{{000000..{SHARDS - 1:06d}}}.tar"


def launch(command: list[str], script: str, log: Path, cache: str, kill_at: str | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``command`` (which runs probe.py) with the probe on ``script``; kill what is left."""
    env = dict(os.environ, PROBE_SCRIPT=script, PROBE_LOG=str(log), PROBE_TEST_PID=str(os.getpid()),
               OMP_NUM_THREADS="1", INFOBATCH_STREAM_CACHE=cache, PYTHONUNBUFFERED="1")
    env.pop("PROBE_KILL_AT", None)
    if kill_at:
        env["PROBE_KILL_AT"] = kill_at
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=str(ROOT))
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        kill_all(family(process.pid))  # whatever the job left running (a timeout, a stray rank)
        process.wait()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def torchrun(processes: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={processes}", *args]


def read_logs(log: Path) -> dict[tuple[int, int], dict]:
    """{(rank, epoch): record} of every epoch a rank ended."""
    logs = {}
    for path in log.glob("rank*-epoch*.json"):
        if path.stem.endswith("-killed"):
            continue
        rank, epoch = path.stem.removeprefix("rank").split("-epoch")
        logs[(int(rank), int(epoch))] = json.loads(path.read_text())
    return logs


def check_killed(killed: subprocess.CompletedProcess, log: Path, store: ibs.ScoreStore,
                 kill_epoch: int) -> None:
    """The kill was real and mid-epoch: the epochs before it were committed, not that one."""
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-5000:]
    assert sorted(read_logs(log)) == [(r, e) for r in (0, 1) for e in range(kill_epoch)]
    assert store.latest_epoch == kill_epoch - 1


def check_resumed(resumed: subprocess.CompletedProcess, killed_log: Path, log: Path,
                  store: ibs.ScoreStore, epochs: int, kill_epoch: int,
                  kill_step: int) -> dict[tuple[int, int], dict]:
    """What the resume after a SIGKILL mid-epoch must do, whatever the trainer; returns the
    logs of both runs.

    - each rank ends each epoch once over the two runs: the resumed run starts at the killed
      epoch, and the store's epochs continue from there to the last;
    - both ranks take the same number of steps in every epoch;
    - every weight a batch carries is the one the store's previous snapshot decides
      (``weights_for``): the DataLoader workers saw each epoch's predecessor committed;
    - the re-run of the killed epoch replays the killed attempt (same samples, same order,
      same losses): the resumed run goes on exactly as if it had not been killed.
    """
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    logs = read_logs(log)
    assert sorted(logs) == [(r, e) for r in (0, 1) for e in range(kill_epoch, epochs)]
    assert store.latest_epoch == epochs - 1
    logs.update(read_logs(killed_log))
    for epoch in range(epochs):
        assert logs[(0, epoch)]["steps"] == logs[(1, epoch)]["steps"] > 0, epoch
        for rank in (0, 1):
            record = logs[(rank, epoch)]
            np.testing.assert_array_equal(record["weights"], record["expected_weights"])
    attempt = json.loads((killed_log / f"rank0-epoch{kill_epoch}-killed.json").read_text())
    assert attempt["steps"] == kill_step
    rerun = logs[(0, kill_epoch)]
    assert rerun["keys"][: len(attempt["keys"])] == attempt["keys"]
    np.testing.assert_array_equal(rerun["losses"][: len(attempt["losses"])], attempt["losses"])
    return logs


def pruned_epochs(logs: dict[tuple[int, int], dict], epochs: int) -> list[int]:
    """The epochs whose batches carried a weight other than 1 (pruning happened)."""
    return [e for e in range(epochs) if any(w != 1 for r in (0, 1) for w in logs[(r, e)]["weights"])]

"""examples/accelerate/train.py in 2 CPU processes under torchrun (``Accelerator(cpu=True)``,
gloo; ``accelerate launch`` starts one process on a CPU), SIGKILLed mid-epoch and resumed
from its checkpoint and its store."""

from __future__ import annotations

import importlib.util

import pytest

import infobatch_stream as ibs

from .conftest import PROBE, check_killed, check_resumed, example, launch, pruned_epochs, torchrun

# Found, not imported: collecting this module stays cheap in every test process.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                reason="accelerate is not installed (the test extra installs it)")

TRAIN = example("accelerate", "train.py")
EPOCHS, KILL_EPOCH, KILL_STEP = 4, 2, 2  # epochs 1 and 2 prune; 3 anneals (floor(0.875 * 4))


def job(digits: str, out) -> list[str]:
    return torchrun(2, PROBE, "--cpu", "--shards", digits, "--out", str(out), "--epochs",
                    str(EPOCHS), "--workers", "1", "--batch-size", "16")


def scalars(logdir) -> dict[str, list[float]]:
    """The scalars of the tensorboard event files under ``logdir``, by tag, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return {tag: [e.value for e in sorted(events.Scalars(tag), key=lambda e: e.step)]
            for tag in events.Tags()["scalars"]}


def test_killed_mid_epoch_then_resumed_goes_on_as_if_never_killed(digits, tmp_path, cache_dir):
    out = tmp_path / "run"
    store = ibs.ScoreStore(str(out / "scores"), cache_dir=cache_dir)
    killed = launch(job(digits, out), TRAIN, tmp_path / "killed-log", cache_dir,
                    kill_at=f"{KILL_EPOCH}:{KILL_STEP}")
    check_killed(killed, tmp_path / "killed-log", store, KILL_EPOCH)
    resumed = launch(job(digits, out), TRAIN, tmp_path / "resumed-log", cache_dir)
    assert f"resumed from epoch-{KILL_EPOCH - 1:04d}" in resumed.stdout, resumed.stdout[-3000:]
    logs = check_resumed(resumed, tmp_path / "killed-log", tmp_path / "resumed-log", store, EPOCHS,
                         KILL_EPOCH, KILL_STEP)
    assert pruned_epochs(logs, EPOCHS) == [1, 2]

    # The tensorboard log of both runs: each epoch's steps, the same on both processes (gathered).
    logged = scalars(out / "infobatch")
    assert logged["steps"] == [logs[(0, e)]["steps"] for e in range(EPOCHS)]
    assert logged["steps_min"] == logged["steps_max"] == logged["steps"]
    assert len(logged["saved_fraction"]) == EPOCHS


def test_prepare_hands_a_webloader_back_unchanged(digits):
    """What the README's "do not prepare the loader" rests on: accelerate passes through what
    is not a DataLoader, so a prepared WebLoader is the WebLoader, split by webdataset."""
    import webdataset as wds
    from accelerate import Accelerator

    loader = wds.WebLoader(wds.WebDataset(digits, shardshuffle=False, empty_check=False), batch_size=None)
    assert Accelerator(cpu=True).prepare(loader) is loader

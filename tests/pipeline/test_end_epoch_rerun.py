"""Re-running ``end_epoch()`` after a failed flush (a full disk, or S3 down past the retry
budget) commits every score recorded in the epoch: the writer keeps rows until they are
written (storage/test_failed_writes.py proves the writer; this is the step a user re-runs)."""

from __future__ import annotations

import errno

import numpy as np
import pytest
import torch

import infobatch_stream as ibs
from infobatch_stream.storage import RetryPolicy, fsio


@pytest.mark.parametrize("failure", ["disk-full", "outage"])
def test_re_running_end_epoch_commits_every_recorded_score(tmp_path, monkeypatch, failure) -> None:
    store = ibs.ScoreStore(str(tmp_path / "scores"), retries=RetryPolicy(attempts=2, first_delay=0.01))
    ib = ibs.InfoBatch(store, num_epochs=3, flush_rows=64)  # background flushes mid-epoch too
    keys = [f"k{i}" for i in range(500)]
    losses = np.random.default_rng(3).gamma(2.0, 1.0, len(keys)).astype(np.float32)
    real = fsio.write_bytes
    failing = [True]

    def write(fs, path, data, **kwargs):
        if "/deltas/" in path and failing[0]:
            if failure == "disk-full":
                raise OSError(errno.ENOSPC, "No space left on device", path)
            raise ConnectionRefusedError("connection refused")
        return real(fs, path, data, **kwargs)

    monkeypatch.setattr(fsio, "write_bytes", write)
    for start in range(0, len(keys), 50):
        try:
            ib.update(torch.from_numpy(losses[start:start + 50]), keys[start:start + 50])
        except ibs.StoreError:  # a background flush's failure, raised by the next call
            pass
    with pytest.raises(ibs.StoreError):
        ib.end_epoch()
    assert store.epochs == []
    failing[0] = False  # space freed, or the server is back: the user re-runs the step
    manifest = ib.end_epoch()
    assert manifest.epoch == 0 and manifest.keys == len(keys)
    assert store.snapshot(0).lookup(keys).tolist() == losses.tolist()

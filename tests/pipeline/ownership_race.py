"""Run by test_ownership_race.py: one training run (its id given as run_id=) on a store that
another run, started at the same moment, also points at.

argv: store, sync directory, out (JSON), run id, epochs. Each run says when it has flushed
its epoch-0 scores (or been refused) and waits for the other before committing: a run that
began first and a run that raced it to the store's first commit are both covered.
"""

import json
import os
import sys
import time

import torch

import infobatch_stream as ibs

store, sync, out, me, epochs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
other = "job-b" if me == "job-a" else "job-a"


def wait_for(path: str) -> None:
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.005)


result = {"run": me, "committed": [], "error": None, "error_type": None}
ib = ibs.InfoBatch(store, num_epochs=epochs, flush_rows=4, run_id=me)
keys = [f"{me}-{i}" for i in range(8)]
try:
    for epoch in ib.epochs():
        ib.update(torch.arange(8, dtype=torch.float32) + epoch, keys)  # flushes at 4 rows
        if epoch == 0:
            open(os.path.join(sync, f"flushed-{me}"), "w").close()
            wait_for(os.path.join(sync, f"flushed-{other}"))
        manifest = ib.end_epoch()
        result["committed"].append(manifest.epoch)
except ibs.StoreError as exc:
    result["error"], result["error_type"] = str(exc), type(exc).__name__
    open(os.path.join(sync, f"flushed-{me}"), "w").close()  # refused: don't keep the other waiting
with open(out, "w") as f:
    json.dump(result, f)

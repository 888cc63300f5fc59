"""Runs a training script unchanged, with a probe on InfoBatch's own methods (and a crash).

    PROBE_SCRIPT=examples/accelerate/train.py PROBE_LOG=DIR [PROBE_KILL_AT=EPOCH:STEP] \\
        python probe.py ARGS...          # or: torchrun ... probe.py ARGS...

Every rank writes ``DIR/rank<r>-epoch<e>.json`` when its ``end_epoch()`` returns: the key
hashes it trained, in order, their losses, the weights the batches carried, the weights
``ib.weights_for`` recomputes from the store's previous snapshot, and its step count.

With ``PROBE_KILL_AT``, rank 0 writes what it trained so far of that epoch
(``rank0-epoch<e>-killed.json``) at that step and SIGKILLs every process of the job
(launcher, ranks, DataLoader workers: what descends from the child of the test process
``PROBE_TEST_PID``) at once, as when the machine goes down.

The script runs as ``__main__`` with ``sys.argv[0]`` left pointing here, so a launcher that
re-executes ``sys.argv`` for the other ranks (Lightning's DDP) runs the probe in them too.
"""

from __future__ import annotations

import json
import os

import torch.distributed as dist
from processes import family, job_root, kill_all

import infobatch_stream as ibs
from infobatch_stream.pipeline.infobatch import InfoBatch

LOG = os.environ["PROBE_LOG"]
KILL_AT = tuple(int(v) for v in os.environ["PROBE_KILL_AT"].split(":")) if os.environ.get(
    "PROBE_KILL_AT") else None
seen: dict = {}


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def write(name: str, record: dict) -> None:
    os.makedirs(LOG, exist_ok=True)
    with open(os.path.join(LOG, name + ".tmp"), "w") as f:
        json.dump(record, f)
    os.replace(os.path.join(LOG, name + ".tmp"), os.path.join(LOG, name))


def fresh() -> dict:
    return {"keys": [], "losses": [], "weights": [], "expected_weights": [], "steps": 0}


def update(self, loss, keys, weights=None, *args, **kwargs):
    epoch = self.epoch
    record = seen.setdefault(epoch, fresh())
    record["keys"] += ibs.hash_keys(keys).tolist()
    record["losses"] += loss.detach().float().cpu().tolist()
    record["weights"] += [float(w) for w in weights.cpu()]
    record["expected_weights"] += self.weights_for(keys).tolist()
    record["steps"] += 1
    result = original_update(self, loss, keys, weights, *args, **kwargs)
    if (epoch, record["steps"]) == KILL_AT and rank() == 0:
        write(f"rank0-epoch{epoch}-killed.json", record)
        kill_all(family(job_root(int(os.environ["PROBE_TEST_PID"]))))
    return result


def end_epoch(self, *args, **kwargs):
    epoch = self.epoch
    result = original_end_epoch(self, *args, **kwargs)
    write(f"rank{rank()}-epoch{epoch}.json", seen.pop(epoch, fresh()))
    return result


original_update, original_end_epoch = InfoBatch.update, InfoBatch.end_epoch
InfoBatch.update, InfoBatch.end_epoch = update, end_epoch

def run_script(path: str) -> None:
    """Run ``path`` as ``__main__``, leaving ``sys.argv[0]`` on this file (runpy would set it
    to ``path``, and a re-executing launcher would then start the other ranks unprobed)."""
    with open(path) as f:
        code = compile(f.read(), path, "exec")
    exec(code, {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})


if __name__ == "__main__":
    run_script(os.environ["PROBE_SCRIPT"])

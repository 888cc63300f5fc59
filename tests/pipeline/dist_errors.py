"""torchrun script: one rank fails inside end_epoch(); every rank must raise, none may hang."""

import sys

import torch
import torch.distributed as dist

import infobatch_stream as ibs
from infobatch_stream.storage import ScoreStore

dist.init_process_group("gloo")
rank = dist.get_rank()
where, store_url = sys.argv[1], sys.argv[2]

if where == "commit" and rank == 0:
    def broken_commit(self, epoch, **kwargs):
        raise OSError(f"disk full while committing epoch {epoch}")
    ScoreStore.commit = broken_commit
if where == "flush" and rank == 1:
    def broken_flush(self):
        raise OSError("network down while flushing")
    from infobatch_stream.storage import DeltaWriter
    DeltaWriter.flush = broken_flush

ib = ibs.InfoBatch(store_url, num_epochs=3)
try:
    for _epoch in ib.epochs():
        ib.update(torch.ones(4), [f"r{rank}-{i}" for i in range(4)])
except Exception as exc:
    print(f"rank {rank} raised {type(exc).__name__}: {exc}", flush=True)
    sys.exit(3)
print(f"rank {rank} finished", flush=True)

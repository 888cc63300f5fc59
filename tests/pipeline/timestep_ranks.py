"""torchrun script: two ranks feed different losses to a TimestepNormalizer; each writes its
table and the scores of one probe batch, which must be the same on every rank."""

import json
import sys

import torch
import torch.distributed as dist

import infobatch_stream as ibs

dist.init_process_group("gloo")
rank = dist.get_rank()
out = sys.argv[1]


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank- and step-dependent losses, so a table built without the all-reduce differs."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    t = torch.randint(0, 100, (8,), generator=g)
    loss = (1.0 + rank) * (0.1 + t / 100.0) * torch.rand(8, generator=g).add(0.5)
    return loss, t


norm = ibs.TimestepNormalizer(num_timesteps=100, buckets=4, momentum=0.5, warmup_steps=2)
fed = []
for step in range(3):       # the second call syncs by itself; the third is folded by sync()
    loss, t = batch(step)
    norm(loss, t)
    fed.append({"loss": loss.tolist(), "t": t.tolist(), "step": step})
norm.sync()
probe = norm(torch.full((4,), 0.5), torch.tensor([5, 30, 55, 80]))
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"state": norm.state_dict(), "probe": probe.tolist(), "fed": fed}, f)
dist.destroy_process_group()

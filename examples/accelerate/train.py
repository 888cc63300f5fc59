"""Hugging Face accelerate with InfoBatch: a small classifier on the digits shards.

    python examples/classification/make_shards.py --out data/digits
    accelerate launch examples/accelerate/train.py --shards 'data/digits/train-{000000..000002}.tar'
    torchrun --nproc_per_node=2 examples/accelerate/train.py --cpu --shards ...   # 2 CPU processes

What InfoBatch adds to an accelerate script: ``ib.stage()`` right after the tar reader,
``ib.epochs()``, ``ib.bound()`` around the loader and ``accelerator.backward(ib.update(...))``.
Three things differ from the usual accelerate recipe, and why:

- The ``WebLoader`` is not prepared. webdataset splits the shards between ranks itself
  (``split_by_node``); a prepared DataLoader over an iterable dataset would either have rank
  0 read every batch and scatter it (``dispatch_batches``, the default for iterable datasets)
  or split each rank's share once more (``IterableDatasetShard``). ``accelerator.prepare``
  returns a ``WebLoader`` as it is anyway; the batches are moved to the device here.
- The keys are the stage's ``__key_hash__``, an int64 tensor: it moves to the device and
  through ``accelerator.gather`` like any tensor, and ``ib.update`` takes it as the key.
- The checkpoint (``accelerator.save_state``) is written after the epoch's commit and holds
  ``ib.state_dict()`` (``register_for_checkpointing``); ``--out`` is resumed when it has one.
"""

from __future__ import annotations

import argparse
import os
import shutil

import torch
import torch.nn.functional as F
import webdataset as wds
from accelerate import Accelerator
from accelerate.utils import is_tensorboard_available

import infobatch_stream as ibs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="webdataset shards of png + cls samples")
    p.add_argument("--out", default="runs/accelerate", help="checkpoints, score store, logs")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--prune-ratio", type=float, default=0.5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="Accelerator(cpu=True): gloo between processes")
    return p.parse_args(argv)


def build_loader(args: argparse.Namespace, ib: ibs.InfoBatch, epoch: int) -> wds.WebLoader:
    """The pipeline of the three lines; a fresh, reproducible shuffle each epoch."""
    dataset = (wds.WebDataset(list(wds.shardlists.expand_urls(args.shards)), shardshuffle=False,
                              nodesplitter=wds.split_by_node, empty_check=False)
               .compose(ib.stage())                      # right after the tar reader
               .shuffle(500, seed=args.seed * 1_000_003 + epoch)
               .decode("torchl")
               .to_tuple("png", "cls", "__key_hash__", "__weight__")
               .batched(args.batch_size, partial=False))
    return wds.WebLoader(dataset, batch_size=None, num_workers=args.workers)


def build_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 10))


def train_one_epoch(accelerator: Accelerator, ib: ibs.InfoBatch, model, optimizer, loader) -> int:
    """One epoch; returns the optimizer steps this process took (the same on every process)."""
    model.train()
    steps = 0
    for batch in ib.bound(loader):                       # same number of steps on every rank
        images, labels, keys, weights = (t.to(accelerator.device, non_blocking=True) for t in batch)
        per_sample = F.cross_entropy(model(images), labels, reduction="none")
        accelerator.backward(ib.update(per_sample, keys, weights))   # records, returns weighted mean
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
    return steps


def epoch_summary(accelerator: Accelerator, ib: ibs.InfoBatch, steps: int) -> dict:
    """What each epoch logs: InfoBatch's metrics and the steps every process took."""
    summary = dict(ib.metrics())  # InfoBatch's plain dict of the epoch
    per_process = accelerator.gather(torch.tensor([steps], device=accelerator.device))
    summary["steps"] = steps
    summary["steps_min"], summary["steps_max"] = int(per_process.min()), int(per_process.max())
    return summary


def checkpoints(args: argparse.Namespace) -> str:
    return os.path.join(args.out, "checkpoints")


def resume(accelerator: Accelerator, args: argparse.Namespace) -> None:
    """Load the latest checkpoint of ``--out``, if any (the model, optimizer, RNGs and ib)."""
    latest = os.path.join(checkpoints(args), "latest")
    if os.path.exists(latest):
        with open(latest) as f:
            name = f.read().strip()
        accelerator.load_state(os.path.join(checkpoints(args), name))
        accelerator.print(f"resumed from {name}")


def save_checkpoint(accelerator: Accelerator, args: argparse.Namespace, epoch: int) -> None:
    """Every process saves its part; then ``latest`` is switched in one rename, so a kill
    mid-save leaves the previous checkpoint in charge, and older checkpoints are removed."""
    name = f"epoch-{epoch:04d}"
    accelerator.save_state(os.path.join(checkpoints(args), name))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        latest = os.path.join(checkpoints(args), "latest")
        with open(latest + ".tmp", "w") as f:
            f.write(name)
        os.replace(latest + ".tmp", latest)
        for old in os.listdir(checkpoints(args)):
            if old.startswith("epoch-") and old != name:
                shutil.rmtree(os.path.join(checkpoints(args), old))
    accelerator.wait_for_everyone()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=args.cpu, project_dir=args.out,
                              log_with="tensorboard" if is_tensorboard_available() else None)
    accelerator.init_trackers("infobatch")
    torch.manual_seed(args.seed)
    ib = ibs.InfoBatch(os.path.join(args.out, "scores"), num_epochs=args.epochs,
                       prune_ratio=args.prune_ratio, seed=args.seed)
    model = build_model()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=args.lr))
    accelerator.register_for_checkpointing(ib)           # ib.state_dict() rides in the checkpoint
    resume(accelerator, args)

    for epoch in ib.epochs():                            # resumes from the store after a restart
        steps = train_one_epoch(accelerator, ib, model, optimizer, build_loader(args, ib, epoch))
        ib.end_epoch()                                   # every process: flush, then one commit
        summary = epoch_summary(accelerator, ib, steps)
        accelerator.log(summary, step=epoch)
        accelerator.print(f"epoch {epoch} done: {summary}")
        save_checkpoint(accelerator, args, epoch)
    accelerator.end_training()


if __name__ == "__main__":
    main()

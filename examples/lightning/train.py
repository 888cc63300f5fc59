"""PyTorch Lightning with InfoBatch: a small classifier on the digits shards.

    python examples/classification/make_shards.py --out data/digits
    python examples/lightning/train.py --shards 'data/digits/train-{000000..000002}.tar' \
        --test data/digits/test-000000.tar
    python examples/lightning/train.py --devices 2 --shards ...     # DDP on 2 CPU processes

What InfoBatch adds to a Lightning script: ``ib.stage()`` in the DataModule's pipeline,
``infobatch.bound(loader)`` around its loader (the same number of batches on every rank),
``ib.update(...)`` as ``training_step``'s loss, and ``InfoBatchCallback`` (it begins and
commits each epoch and puts ``ib.state_dict()`` in Lightning's checkpoint). A run whose
``--out`` has a checkpoint resumes from it (``ckpt_path="last"``) and from its score store.
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as L
import torch
import torch.nn.functional as F
import webdataset as wds

import infobatch_stream as ibs
from infobatch_stream.lightning import InfoBatchCallback


class DigitsModule(L.LightningModule):
    """The model, and a training step whose loss is ``ib.update``'s weighted mean."""

    def __init__(self, ib: ibs.InfoBatch, lr: float):
        super().__init__()
        self.ib, self.lr = ib, lr
        self.model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64),
                                         torch.nn.ReLU(), torch.nn.Linear(64, 10))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels, keys, weights = batch
        per_sample = F.cross_entropy(self.model(images), labels, reduction="none")
        return self.ib.update(per_sample, keys, weights)     # records scores, weighted mean

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        accuracy = (self.model(images).argmax(1) == labels).float().mean()
        self.log("val_accuracy", accuracy, sync_dist=True, batch_size=len(labels))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class DigitsData(L.LightningDataModule):
    """The pipeline of the three lines, rebuilt each epoch with that epoch's shuffle."""

    def __init__(self, args: argparse.Namespace, ib: ibs.InfoBatch, infobatch: InfoBatchCallback):
        super().__init__()
        self.args, self.ib, self.infobatch = args, ib, infobatch

    def train_dataloader(self):
        args = self.args
        dataset = (wds.WebDataset(list(wds.shardlists.expand_urls(args.shards)), shardshuffle=False,
                                  nodesplitter=wds.split_by_node, empty_check=False)
                   .compose(self.ib.stage())              # right after the tar reader
                   .shuffle(500, seed=args.seed * 1_000_003 + self.ib.epoch)
                   .decode("torchl")
                   .to_tuple("png", "cls", "__key_hash__", "__weight__")
                   .batched(args.batch_size, partial=False))
        loader = wds.WebLoader(dataset, batch_size=None, num_workers=args.workers)
        return self.infobatch.bound(loader)               # same number of batches on every rank

    def val_dataloader(self):
        if not self.args.test:
            return []
        dataset = (wds.WebDataset(list(wds.shardlists.expand_urls(self.args.test)), shardshuffle=False,
                                  nodesplitter=wds.split_by_node, empty_check=False)
                   .decode("torchl").to_tuple("png", "cls").batched(256))
        return wds.WebLoader(dataset, batch_size=None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="webdataset shards of png + cls samples")
    p.add_argument("--test", default="", help="shards to validate on after each epoch")
    p.add_argument("--out", default="runs/lightning", help="checkpoints, score store, logs")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--prune-ratio", type=float, default=0.5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--devices", type=int, default=1, help="CPU processes (DDP when > 1)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_trainer(args: argparse.Namespace, infobatch: InfoBatchCallback) -> L.Trainer:
    last = L.callbacks.ModelCheckpoint(dirpath=os.path.join(args.out, "checkpoints"), save_last=True)
    return L.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs, callbacks=[infobatch, last], default_root_dir=args.out,
        reload_dataloaders_every_n_epochs=1,   # a fresh pipeline (and shuffle) each epoch
        deterministic=True, enable_progress_bar=False, enable_model_summary=False)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    ib = ibs.InfoBatch(os.path.join(args.out, "scores"), num_epochs=args.epochs,
                       prune_ratio=args.prune_ratio, seed=args.seed)
    infobatch = InfoBatchCallback(ib)
    trainer = build_trainer(args, infobatch)
    # "last": resume from the latest checkpoint in --out, if there is one
    trainer.fit(DigitsModule(ib, args.lr), datamodule=DigitsData(args, ib, infobatch), ckpt_path="last")


if __name__ == "__main__":
    main()

"""A small CNN on the digits shards, with InfoBatch, random pruning or no pruning.

    python examples/classification/train.py --shards data/digits/train-000000.tar \\
        --test data/digits/test-000000.tar --out runs/digits-ib
    python examples/classification/train.py ... --policy random      # same budget, random samples
    python examples/classification/train.py ... --no-prune           # the baseline

The InfoBatch lines: ``ib.stage()`` after the tar reader, the per-sample cross-entropy
through ``ib.update`` (its weighted mean is what is backpropagated), ``ib.bound`` around the
loader, ``ib.epochs()``, and ``ib.end_epoch(wait=False)`` (which commits each epoch to the
score store while the model is evaluated) with ``ib.metrics()`` logged per epoch. The FFHQ
diffusion example adds checkpoints, ``--resume`` and DDP on top of the same loop.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import fsspec
import torch
import torch.nn.functional as F
import webdataset as wds

import infobatch_stream as ibs
from infobatch_stream.storage import storage_option


def build_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Dropout(0.25), torch.nn.Linear(64 * 4 * 4, 128),
        torch.nn.ReLU(), torch.nn.Linear(128, 10))


def to_input(image: torch.Tensor) -> torch.Tensor:
    """A decoded 8x8 grayscale image ("torchl": HxW in [0, 1]) -> 1x8x8 in [-1, 1]."""
    return (image[None] - 0.5) / 0.5


def train_loader(args, stage, epoch: int):
    """The epoch's loader, with ``stage`` (InfoBatch's) right after the tar reader."""
    urls = list(wds.shardlists.expand_urls(args.shards))
    seed = args.seed * 1_000_003 + epoch   # a fresh, reproducible order every epoch
    dataset = (wds.WebDataset(urls, shardshuffle=len(urls), seed=seed,
                              nodesplitter=wds.split_by_node, empty_check=False)
               .compose(stage)                 # prune before decode
               .shuffle(2000, seed=seed)
               .decode("torchl")
               .to_tuple("png", "cls", "__key__", "__weight__")
               .map_tuple(to_input, None, None, None)
               .batched(args.batch_size, partial=False))
    return wds.WebLoader(dataset, batch_size=None, num_workers=args.workers)


def load_test(pattern: str) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = (wds.WebDataset(list(wds.shardlists.expand_urls(pattern)), shardshuffle=False,
                              empty_check=False)
               .decode("torchl").to_tuple("png", "cls").map_tuple(to_input, None))
    images, labels = zip(*dataset, strict=True)
    return torch.stack(images), torch.tensor(labels)


def learning_rate(args, progress: float) -> float:
    """One epoch of linear warmup, then cosine to 0, over (fractional) epochs done.

    Each epoch's exact step count is known when it starts (``ib.plan()``), so the schedule
    follows the epochs however much is pruned, and always ends at 0.
    """
    return args.lr * min(1.0, progress) * 0.5 * (1 + math.cos(math.pi * progress / args.epochs))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--shards", required=True)
    p.add_argument("--test", required=True, help="test shards (accuracy each epoch)")
    p.add_argument("--dataset-size", type=int, default=None,
                   help="samples in --shards (counted with one pass if left out)")
    p.add_argument("--out", default="runs/digits", help="folder or URL for the store and summary")
    p.add_argument("--store", default=None, help="score store URL (default: OUT/scores)")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   type=storage_option)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--prune-ratio", type=float, default=0.5)
    p.add_argument("--delta", type=float, default=0.875)
    p.add_argument("--policy", choices=["infobatch", "random"], default="infobatch")
    p.add_argument("--no-prune", action="store_true", help="the baseline: prune_ratio=0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="only the final line")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ib, options = open_infobatch(args)
    dataset_size = args.dataset_size or count_samples(args.shards)
    test_images, test_labels = load_test(args.test)
    torch.manual_seed(args.seed)
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)

    history, started = [], time.perf_counter()
    for epoch in ib.epochs():                       # commits each epoch to the score store
        kept = ib.plan(dataset_size).samples        # exact, before the epoch starts
        loader = train_loader(args, ib.stage(), epoch)
        trained, loss_sum = train_one_epoch(args, ib, model, optimizer, loader, epoch, kept)
        ib.end_epoch(wait=False)                    # the commit overlaps the evaluation
        accuracy = evaluate(model, test_images, test_labels)
        history.append({"epoch": epoch, "trained": trained, "pruned": dataset_size - kept,
                        "train_loss": loss_sum / max(1, trained), "test_accuracy": accuracy,
                        "infobatch": ib.metrics()})  # waits for the commit; a plain dict to log
        if not args.quiet:
            print_epoch(args, history[-1])
    return save_summary(args, options, dataset_size, history, time.perf_counter() - started)


def train_one_epoch(args, ib: ibs.InfoBatch, model, optimizer, loader, epoch: int,
                    kept: int) -> tuple[int, float]:
    """One pass over what the stage kept; returns (samples trained, their summed loss)."""
    epoch_steps = max(1, kept // args.batch_size)
    trained, loss_sum = 0, 0.0
    model.train()
    for step, (images, labels, keys, weights) in enumerate(ib.bound(loader)):  # same steps, every rank
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args, epoch + min(step, epoch_steps - 1) / epoch_steps)
        per_sample = F.cross_entropy(model(images), torch.as_tensor(labels), reduction="none")
        loss = ib.update(per_sample, keys, weights)  # records the scores; the weighted mean
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        trained += len(keys)
        loss_sum += per_sample.detach().sum().item()
    return trained, loss_sum


def evaluate(model, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        return (model(images).argmax(1) == labels).float().mean().item()


def open_infobatch(args) -> tuple[ibs.InfoBatch, dict]:
    """The run's InfoBatch on a fresh store, and the storage options for shards and outputs."""
    options = dict(args.storage_option)
    if options:
        for url in (args.shards, args.test):
            if "://" in url:
                ibs.set_shard_storage_options(url.split("://", 1)[0], **options)
    ib = ibs.InfoBatch(args.store or f"{args.out.rstrip('/')}/scores", num_epochs=args.epochs,
                       prune_ratio=0.0 if args.no_prune else args.prune_ratio, delta=args.delta,
                       seed=args.seed, storage_options=options or None, policy=args.policy)
    if ib.epoch > 0:
        raise SystemExit(f"the store {ib.store.url} already holds epochs; use a new --out/--store")
    return ib, options


def count_samples(pattern: str) -> int:
    return sum(1 for _ in wds.WebDataset(list(wds.shardlists.expand_urls(pattern)),
                                         shardshuffle=False, empty_check=False))


def print_epoch(args, h: dict) -> None:
    metrics = h["infobatch"]
    print(f"epoch {h['epoch']:3d}/{args.epochs}  trained {h['trained']:5d}  pruned {h['pruned']:5d}  "
          f"train loss {h['train_loss']:.4f}  test accuracy {h['test_accuracy']:.4f}  "
          f"saved {100 * metrics['saved_fraction']:.1f}%  "
          f"blocked {1000 * metrics['blocking_seconds']:.0f} ms", flush=True)


def save_summary(args, options: dict, dataset_size: int, history: list[dict],
                 seconds: float) -> dict:
    """OUT/summary.json (OUT local or any fsspec URL), and the run's one-line result."""
    mode = "baseline" if args.no_prune else args.policy
    pruned = sum(h["pruned"] for h in history)
    summary = {"mode": mode, "seed": args.seed, "epochs": args.epochs,
               "dataset_size": dataset_size, "trained": sum(h["trained"] for h in history),
               "pruned": pruned, "saving": pruned / (dataset_size * max(1, len(history))),
               "test_accuracy": history[-1]["test_accuracy"] if history else math.nan,
               "seconds": seconds, "history": history}
    fs, root = fsspec.core.url_to_fs(args.out.rstrip("/"), **options)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/summary.json", json.dumps(summary, indent=1).encode())
    print(f"{mode} seed {args.seed}: test accuracy {summary['test_accuracy']:.4f}, "
          f"{summary['trained']} samples trained, {100 * summary['saving']:.1f}% pruned, "
          f"{summary['seconds']:.1f}s", flush=True)
    return summary


if __name__ == "__main__":
    main()

"""Train a DDPM (diffusers' UNet2DModel + DDPMScheduler) on face shards with InfoBatch.

One process, or one per GPU under torchrun (DDP; gloo on CPU, nccl on GPU):

    python examples/ffhq_diffusion/train.py --shards 'data/shards/train-{000000..000001}.tar' \\
        --heldout data/shards/heldout-000000.tar --out runs/ib --image-size 16
    torchrun --nproc_per_node=8 examples/ffhq_diffusion/train.py --model base --image-size 64 \\
        --shards 's3://bucket/ffhq64/train-{000000..000059}.tar' --dataset-size 60000 \\
        --heldout 's3://bucket/ffhq64/heldout-{000000..000009}.tar' \\
        --store s3://bucket/runs/ffhq64/scores --out runs/ffhq64 --epochs 100 --workers 8

What InfoBatch adds to the loop: ``ib.stage()`` right after the tar reader (pruned samples are
never decoded), the per-sample noise-prediction MSE as each sample's score through
``ib.update`` (which returns the weighted mean to backpropagate), ``ib.bound`` for the same
number of steps on every rank, ``ib.plan_steps`` for the LR schedule, and ``ib.state_dict``
in the checkpoint. ``--no-prune`` runs the very same code with ``prune_ratio=0`` (the baseline).

Each epoch is committed to the score store, then checkpointed (model, optimizer, LR schedule,
``ib.state_dict()``, the log) to ``OUT/checkpoint.pt``; ``--resume`` continues from there.
At the end: ``OUT/samples.png`` (generated faces), ``OUT/curves.png`` (losses and saving per
epoch) and ``OUT/summary.json``. ``--out`` and ``--store`` may be local or any fsspec URL;
S3 credentials and endpoint come from the AWS variables or ``--storage-option key=value``.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
import time
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import webdataset as wds
from fsspec.implementations.local import LocalFileSystem

import infobatch_stream as ibs
from infobatch_stream.storage import storage_option

MODELS = {  # block_out_channels, layers_per_block, attention at the lowest resolution
    "tiny": ((32, 64, 64), 1, False),
    "small": ((64, 128, 128, 256), 2, True),
    "base": ((128, 128, 256, 256, 512, 512), 2, True),   # DDPM's 256x256 UNet, as in diffusers
}
CHECKPOINT = "checkpoint.pt"
EVAL_NOISE_SEED = 20240607   # the held-out noise is the same for every run and every seed


# -- small helpers ------------------------------------------------------------------------


class Output:
    """The run's output folder on any fsspec URL; files are replaced whole (never half-written)."""

    def __init__(self, url: str, storage_options: dict):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **storage_options)
        self.fs.makedirs(self.root, exist_ok=True)

    def path(self, name: str) -> str:
        return f"{self.url}/{name}"

    def write(self, name: str, data: bytes) -> None:
        target = f"{self.root}/{name}"
        if isinstance(self.fs, LocalFileSystem):
            tmp = f"{target}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)   # a kill mid-save leaves the previous checkpoint intact
        else:
            self.fs.pipe_file(target, data)   # object stores: one PUT, all or nothing

    def read(self, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(f"{self.root}/{name}")
        except FileNotFoundError:
            return None


def expand_urls(pattern: str) -> list[str]:
    return list(wds.shardlists.expand_urls(pattern))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def log(*parts) -> None:
    if rank() == 0:
        print(*parts, flush=True)


# -- data ---------------------------------------------------------------------------------

def to_model_range(image: torch.Tensor, size: int) -> torch.Tensor:
    """A decoded CHW float image in [0, 1] -> ``size`` x ``size`` in [-1, 1]."""
    if image.shape[-1] != size or image.shape[-2] != size:
        image = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False)[0]
    return image * 2 - 1


def train_loader(args, stage, epoch: int):
    """The epoch's loader; the pruning ``stage`` comes right after the tar reader, before decode.

    Built per epoch so the shard and sample shuffles are seeded by (seed, epoch): a resumed
    run sees the same order as an uninterrupted one.
    """
    urls = expand_urls(args.shards)
    shuffle_seed = args.seed * 1_000_003 + epoch
    dataset = (
        wds.WebDataset(urls, shardshuffle=len(urls), seed=shuffle_seed,
                       nodesplitter=wds.split_by_node, empty_check=False)
        .compose(stage)
        .shuffle(args.shuffle_buffer, seed=shuffle_seed)
        .decode("torchrgb")
        .to_tuple("png;jpg;jpeg", "__key__", "__weight__")
        .map_tuple(functools.partial(to_model_range, size=args.image_size), None, None)
        .batched(args.batch_size, partial=False)
    )
    return wds.WebLoader(dataset, batch_size=None, num_workers=args.workers)


def count_samples(pattern: str) -> int:
    log(f"counting the samples of {pattern} (pass --dataset-size to skip this)")
    return sum(1 for _ in wds.WebDataset(expand_urls(pattern), shardshuffle=False,
                                         nodesplitter=None, empty_check=False))


def load_heldout(args) -> torch.Tensor | None:
    """The held-out images (never in the training shards), all in memory, in key order."""
    if not args.heldout:
        return None
    # all of it, whatever the rank (nodesplitter=None); only rank 0 evaluates
    dataset = (wds.WebDataset(expand_urls(args.heldout), shardshuffle=False, nodesplitter=None,
                              empty_check=False)
               .decode("torchrgb").to_tuple("__key__", "png;jpg;jpeg"))
    samples = sorted(dataset, key=lambda s: s[0])[: args.eval_images]
    return torch.stack([to_model_range(image, args.image_size) for _, image in samples])


# -- model --------------------------------------------------------------------------------

def build_model(args):
    from diffusers import UNet2DModel

    channels, layers, attention = MODELS[args.model]
    if args.channels:
        channels = tuple(int(c) for c in args.channels.split(","))
    down = ["DownBlock2D"] * len(channels)
    up = ["UpBlock2D"] * len(channels)
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(sample_size=args.image_size, in_channels=3, out_channels=3,
                       layers_per_block=layers, block_out_channels=channels,
                       down_block_types=tuple(down), up_block_types=tuple(up),
                       norm_num_groups=min(32, channels[0] // 4))


def heldout_loss(model, scheduler, images: torch.Tensor, timesteps: int, device) -> float:
    """Mean noise-prediction MSE over the held-out images at fixed timesteps and fixed noise.

    The timesteps are evenly spread over the schedule and the noise comes from a fixed seed,
    so two runs (or two epochs) are scored on exactly the same problems.
    """
    generator = torch.Generator().manual_seed(EVAL_NOISE_SEED)
    total_steps = scheduler.config.num_train_timesteps   # the middle of each of ``timesteps`` bins
    steps = ((torch.arange(timesteps) + 0.5) * total_steps / timesteps).long()
    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for t in steps:
            noise = torch.randn(images.shape, generator=generator)
            for start in range(0, len(images), 256):
                x0 = images[start:start + 256]
                n = noise[start:start + 256]
                tt = t.expand(len(x0))
                noisy = scheduler.add_noise(x0, n, tt)
                pred = model(noisy.to(device), tt.to(device)).sample.float().cpu()
                total += F.mse_loss(pred, n, reduction="sum").item() / n[0].numel()
                count += len(x0)
    model.train()
    return total / count


def generate(model, train_scheduler, count: int, size: int, steps: int, device) -> torch.Tensor:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(train_scheduler.config)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(EVAL_NOISE_SEED)
    x = torch.randn((count, 3, size, size), generator=generator).to(device)
    model.eval()
    with torch.inference_mode():
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t).sample, t, x).prev_sample
    return ((x.clamp(-1, 1) + 1) / 2).cpu()


# -- outputs ------------------------------------------------------------------------------

def image_grid_png(images: torch.Tensor, scale: int) -> bytes:
    from PIL import Image

    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    size = images.shape[-1]
    grid = np.full((rows * size, cols * size, 3), 255, np.uint8)
    pixels = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for i, image in enumerate(pixels):
        r, c = divmod(i, cols)
        grid[r * size:(r + 1) * size, c * size:(c + 1) * size] = image
    picture = Image.fromarray(grid).resize((cols * size * scale, rows * size * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def curves_png(history: list[dict], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    if history and history[0]["heldout_loss"] is not None:
        left.plot(epochs, [h["heldout_loss"] for h in history], "s-", label="held-out")
    left.set_xlabel("epoch")
    left.set_ylabel("noise-prediction MSE")
    left.set_yscale("log")
    left.legend()
    right.bar(epochs, [100 * h["pruned"] / h["dataset_size"] for h in history],
              color="tab:orange", alpha=0.5, label="pruned this epoch")
    right.plot(epochs, [100 * h["cumulative_saving"] for h in history], "k.-",
               label="cumulative saving")
    right.set_xlabel("epoch")
    right.set_ylabel("% of samples")
    right.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


# -- training -----------------------------------------------------------------------------

def learning_rate(args, progress: float) -> float:
    """Linear warmup, then cosine to 0, as a function of epochs done (fractional).

    A function of epoch progress rather than of a step budget: each epoch's exact number of
    steps is known when it starts (``ib.plan()``), while the budget planned at epoch 0 has to
    guess how much pruning will save. The schedule ends at 0 however much is pruned, and a
    resumed run needs no scheduler state.
    """
    warm = min(1.0, progress / args.warmup) if args.warmup > 0 else 1.0
    return args.lr * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, progress / args.epochs)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--shards", required=True, help="training shards: a file, brace pattern or URL")
    p.add_argument("--dataset-size", type=int, default=None,
                   help="samples in --shards (counted with one pass over the shards if left out)")
    p.add_argument("--heldout", default=None, help="held-out shards (images not in --shards)")
    p.add_argument("--out", default="runs/ffhq", help="checkpoint, images, summary: folder or URL")
    p.add_argument("--store", default=None, help="score store URL (default: OUT/scores)")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   type=storage_option,
                   help="fsspec option for the store, the shards and --out (repeatable)")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--lr", type=float, default=2e-3, help="peak LR (warmup, then cosine to 0)")
    p.add_argument("--warmup", type=float, default=0.5, help="epochs of linear LR warmup")
    p.add_argument("--lr-schedule", choices=["cosine", "onecycle"], default="cosine",
                   help="cosine: warmup + cosine over epochs, each epoch's steps counted exactly "
                        "by ib.plan(); onecycle: OneCycleLR over the step budget of "
                        "ib.plan_steps(), fixed before epoch 0 (a guess of what pruning saves)"),
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--channels", default=None, help="override the block widths, e.g. 32,64,64")
    p.add_argument("--train-timesteps", type=int, default=1000)
    p.add_argument("--prune-ratio", type=float, default=0.5)
    p.add_argument("--delta", type=float, default=0.875)
    p.add_argument("--policy", choices=["infobatch", "random"], default="infobatch")
    p.add_argument("--no-prune", action="store_true",
                   help="the baseline: the same loop and stage with prune_ratio=0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--eval-images", type=int, default=256)
    p.add_argument("--eval-timesteps", type=int, default=8)
    p.add_argument("--sample-images", type=int, default=36)
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps for samples.png")
    return p.parse_args(argv)


def setup_distributed():
    if "RANK" not in os.environ:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return torch.device("cuda", local)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = setup_distributed()
    options = storage_options(args)
    out = Output(args.out, options)
    store_url = args.store or out.path("scores")
    trainer = build_trainer(args, device)
    ib = ibs.InfoBatch(store_url, num_epochs=args.epochs, prune_ratio=prune_ratio(args),
                       delta=args.delta, seed=args.seed, storage_options=options or None,
                       policy=args.policy)
    state = resume(args, out, ib, trainer, store_url)
    history, train_seconds = (state["history"], state["train_seconds"]) if state else ([], 0.0)
    dataset_size = args.dataset_size or count_samples(args.shards)
    prepare_training(args, ib, trainer, dataset_size, state)
    heldout = load_heldout(args) if rank() == 0 else None
    log_setting(args, trainer, dataset_size, store_url)

    for epoch in ib.epochs():                           # resumes from the store after a restart
        started, cpu_started = time.perf_counter(), time.process_time()
        plan = ib.plan(dataset_size)                    # exact: decided from the committed snapshot
        loader = train_loader(args, ib.stage(), epoch)  # the stage prunes before decode
        trained, loss_sum, steps = train_one_epoch(args, ib, trainer, loader, epoch, plan.samples)
        ib.end_epoch(wait=False)                        # all ranks flush, rank 0 commits, meanwhile:
        held, eval_seconds, eval_cpu = evaluate(args, trainer, heldout)
        metrics = ib.metrics()                          # waits for the commit; a plain dict to log
        seconds = time.perf_counter() - started - eval_seconds   # training only
        train_seconds += seconds
        history.append(epoch_record(
            history, epoch=epoch, trained=trained, pruned=dataset_size - plan.samples, steps=steps,
            dataset_size=dataset_size, loss_sum=loss_sum, held=held, lr=trainer.lr, seconds=seconds,
            cpu_seconds=time.process_time() - cpu_started - eval_cpu, eval_seconds=eval_seconds,
            threshold=plan.rule.threshold, infobatch=metrics))
        if rank() == 0:
            save_checkpoint(out, args, trainer, ib, epoch, history, train_seconds)
        log_epoch(args, history[-1])

    summary = summarize(args, dataset_size, history, train_seconds)
    if rank() == 0 and history:
        write_outputs(args, out, trainer, history, summary)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return summary


# -- the steps of main ------------------------------------------------------------------------

@dataclass
class Trainer:
    """The model and what trains it, on ``device``."""

    model: torch.nn.Module
    net: torch.nn.Module                     # what the forward pass calls: the model or its DDP
    noise_scheduler: object                  # diffusers' DDPMScheduler
    optimizer: torch.optim.Optimizer
    device: torch.device
    lr_schedule: object | None = None        # OneCycleLR, with --lr-schedule onecycle

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def prune_ratio(args) -> float:
    return 0.0 if args.no_prune else args.prune_ratio


def storage_options(args) -> dict:
    """The --storage-option pairs, also handed to webdataset for the shards' URLs."""
    options = dict(args.storage_option)
    if options:  # the shards' URLs are opened by webdataset, in the DataLoader workers
        for url in filter(None, (args.shards, args.heldout)):
            if "://" in url:
                ibs.set_shard_storage_options(url.split("://", 1)[0], **options)
    return options


def build_trainer(args, device) -> Trainer:
    from diffusers import DDPMScheduler

    torch.manual_seed(args.seed)   # model init; the training noise has its own generator
    model = build_model(args).to(device)
    noise_scheduler = DDPMScheduler(num_train_timesteps=args.train_timesteps,
                                    beta_schedule="squaredcos_cap_v2")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    return Trainer(model, model, noise_scheduler, optimizer, device)


def resume(args, out: Output, ib: ibs.InfoBatch, trainer: Trainer, store_url: str) -> dict | None:
    """With --resume, load OUT/checkpoint.pt into ``ib`` and the trainer and return it.

    Without --resume, a store that already holds epochs is refused: never train over it.
    """
    checkpoint = out.read(CHECKPOINT) if args.resume else None
    if checkpoint is not None:
        state = torch.load(io.BytesIO(checkpoint), map_location="cpu", weights_only=True)
        ib.load_state_dict(state["infobatch"])
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        log(f"resumed from {out.path(CHECKPOINT)} (epoch {state['epoch']} done); "
            f"continuing at epoch {ib.epoch}")
        return state
    if ib.epoch > 0 and not args.resume:
        raise SystemExit(f"the store {store_url} already holds epochs 0..{ib.epoch - 1}: pass "
                         f"--resume to continue that run, or a new --store / --out")
    if args.resume:
        log(f"--resume: no checkpoint at {out.path(CHECKPOINT)}; starting at epoch {ib.epoch}")
    return None


def prepare_training(args, ib: ibs.InfoBatch, trainer: Trainer, dataset_size: int,
                     state: dict | None) -> None:
    """The OneCycle schedule if asked for (restored from ``state``), and DDP when distributed."""
    if args.lr_schedule == "onecycle":
        # The run's step budget, fixed now; bound() keeps every epoch within it.
        plan = ib.plan_steps(dataset_size=dataset_size, batch_size=args.batch_size)
        trainer.lr_schedule = torch.optim.lr_scheduler.OneCycleLR(
            trainer.optimizer, max_lr=args.lr, total_steps=max(1, plan.total_steps),
            pct_start=min(0.5, args.warmup / args.epochs), cycle_momentum=False)
        if state is not None:
            trainer.lr_schedule.load_state_dict(state["lr_scheduler"])
    if dist.is_initialized():
        trainer.net = torch.nn.parallel.DistributedDataParallel(
            trainer.model, device_ids=[trainer.device.index] if trainer.device.type == "cuda" else None)


def train_one_epoch(args, ib: ibs.InfoBatch, trainer: Trainer, loader, epoch: int,
                    kept: int) -> tuple[int, float, int]:
    """One pass over what the stage kept: (samples trained and their summed loss, over all
    ranks; this rank's steps)."""
    epoch_steps = max(1, kept // (args.batch_size * world_size()))
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch * 1009 + rank())
    trained, loss_sum, steps = 0, 0.0, 0
    for images, keys, weights in ib.bound(loader):      # the same number of steps on every rank
        per_sample = per_sample_loss(args, trainer, images, generator)
        loss = ib.update(per_sample, keys, weights)     # records the scores; the weighted mean
        optimizer_step(args, trainer, loss, epoch + min(steps, epoch_steps - 1) / epoch_steps)
        trained += len(images)
        loss_sum += per_sample.detach().sum().item()
        steps += 1
    totals = torch.tensor([trained, loss_sum], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(totals)
    return int(totals[0]), float(totals[1]), steps


def per_sample_loss(args, trainer: Trainer, images: torch.Tensor, generator) -> torch.Tensor:
    """Each image's noise-prediction MSE, randomly flipped, at a random timestep."""
    flip = torch.rand(len(images), generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    noise = torch.randn(images.shape, generator=generator)
    t = torch.randint(0, args.train_timesteps, (len(images),), generator=generator)
    noisy = trainer.noise_scheduler.add_noise(images, noise, t)
    pred = trainer.net(noisy.to(trainer.device), t.to(trainer.device)).sample
    return F.mse_loss(pred.float(), noise.to(trainer.device), reduction="none").mean(dim=(1, 2, 3))


def optimizer_step(args, trainer: Trainer, loss: torch.Tensor, progress: float) -> None:
    """Backpropagate ``loss`` and step; the cosine schedule sets the LR from epoch ``progress``."""
    if trainer.lr_schedule is None:
        lr = learning_rate(args, progress)
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0)
    trainer.optimizer.step()
    if trainer.lr_schedule is not None:
        trainer.lr_schedule.step()


def evaluate(args, trainer: Trainer, heldout: torch.Tensor | None) -> tuple[float | None, float, float]:
    """The held-out loss (None without held-out images), and the wall and CPU seconds it took."""
    started, cpu_started = time.perf_counter(), time.process_time()
    held = heldout_loss(trainer.model, trainer.noise_scheduler, heldout, args.eval_timesteps,
                        trainer.device) if heldout is not None else None
    return held, time.perf_counter() - started, time.process_time() - cpu_started


def epoch_record(history: list[dict], *, epoch: int, trained: int, pruned: int, steps: int,
                 dataset_size: int, loss_sum: float, held: float | None, lr: float, seconds: float,
                 cpu_seconds: float, eval_seconds: float, threshold: float | None,
                 infobatch: dict) -> dict:
    """The epoch's line of the history (``history``: the epochs before it)."""
    pruned_so_far = pruned + sum(h["pruned"] for h in history)
    return {
        "epoch": epoch, "trained": trained, "pruned": pruned, "steps": steps,
        "dataset_size": dataset_size,
        "cumulative_saving": pruned_so_far / (dataset_size * (len(history) + 1)),
        "train_loss": loss_sum / max(1, trained), "heldout_loss": held,
        "lr": lr, "seconds": seconds, "cpu_seconds": cpu_seconds, "eval_seconds": eval_seconds,
        "threshold": threshold, "infobatch": infobatch,
    }


def save_checkpoint(out: Output, args, trainer: Trainer, ib: ibs.InfoBatch, epoch: int,
                    history: list[dict], train_seconds: float) -> None:
    """OUT/checkpoint.pt, replaced whole: everything --resume needs, ib.state_dict() included."""
    lr_schedule = trainer.lr_schedule
    buffer = io.BytesIO()
    torch.save({"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                "lr_scheduler": None if lr_schedule is None else lr_schedule.state_dict(),
                "infobatch": ib.state_dict(),
                "epoch": epoch, "history": history, "train_seconds": train_seconds,
                "args": vars(args)}, buffer)
    out.write(CHECKPOINT, buffer.getvalue())


def log_setting(args, trainer: Trainer, dataset_size: int, store_url: str) -> None:
    setting = ("baseline (no pruning)" if args.no_prune
               else f"InfoBatch r={prune_ratio(args)} delta={args.delta} policy={args.policy}")
    log(f"{setting}: {dataset_size} samples, {args.epochs} epochs, "
        f"batch {args.batch_size} x {world_size()} ranks, model {args.model} "
        f"({sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f}M params), "
        f"{args.image_size}px, store {store_url}")


def log_epoch(args, h: dict) -> None:
    held = h["heldout_loss"]
    log(f"epoch {h['epoch']:3d}/{args.epochs}  trained {h['trained']:6d}  pruned {h['pruned']:6d} "
        f"({100 * h['pruned'] / h['dataset_size']:4.1f}%)  "
        f"saved so far {100 * h['cumulative_saving']:4.1f}%"
        f"  train loss {h['train_loss']:.4f}  held-out "
        f"{'-' if held is None else f'{held:.4f}'}  lr {h['lr']:.2e}  {h['seconds']:5.1f}s"
        f" (+{h['eval_seconds']:.1f}s eval, {1000 * h['infobatch']['blocking_seconds']:.0f} ms"
        f" blocked by the commit)"
        f"  [checkpoint epoch {h['epoch']}]")


def summarize(args, dataset_size: int, history: list[dict], train_seconds: float) -> dict:
    return {
        "mode": "baseline" if args.no_prune else args.policy, "seed": args.seed,
        "epochs": args.epochs, "dataset_size": dataset_size, "lr_schedule": args.lr_schedule,
        "steps": sum(h["steps"] for h in history),
        "trained": sum(h["trained"] for h in history),
        "pruned": sum(h["pruned"] for h in history),
        "saving": sum(h["pruned"] for h in history) / (dataset_size * max(1, len(history))),
        "final_heldout_loss": history[-1]["heldout_loss"] if history else None,
        "train_seconds": train_seconds,
        "train_cpu_seconds": sum(h["cpu_seconds"] for h in history), "history": history,
    }


def write_outputs(args, out: Output, trainer: Trainer, history: list[dict], summary: dict) -> None:
    """OUT/samples.png (faces generated by the trained model), curves.png and summary.json."""
    samples = generate(trainer.model, trainer.noise_scheduler, args.sample_images, args.image_size,
                       args.sample_steps, trainer.device)
    out.write("samples.png", image_grid_png(samples, scale=max(1, 96 // args.image_size)))
    title = "baseline (no pruning)" if args.no_prune else \
        f"{'InfoBatch' if args.policy == 'infobatch' else 'random pruning'} (r={prune_ratio(args)})"
    out.write("curves.png", curves_png(history, f"{title}, seed {args.seed}"))
    out.write("summary.json", json.dumps(summary, indent=1).encode())
    log(f"done: {summary['trained']} samples trained in {summary['steps']} steps, "
        f"{100 * summary['saving']:.1f}% pruned, final held-out loss "
        f"{summary['final_heldout_loss']}, {summary['train_seconds']:.1f}s training (without the "
        f"held-out evaluation); "
        f"wrote {out.path('samples.png')}, {out.path('curves.png')}, {out.path('summary.json')}")


if __name__ == "__main__":
    main()

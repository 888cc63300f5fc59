"""Train an unconditional diffusion model on face shards with InfoBatch, on accelerate.

The flags are those of diffusers' ``train_unconditional.py`` (``--resolution``,
``--train_batch_size``, ``--use_ema``, ``--checkpointing_steps``, ...) plus the data's and
InfoBatch's (``--shards``, ``--store``, ``--prune_ratio``, ``--no_prune``, ...). One process,
torchrun on CPUs (gloo), or accelerate on GPUs:

    python examples/ffhq_diffusion/train.py --shards 'data/shards/train-{000000..000002}.tar' \\
        --heldout data/shards/heldout-000000.tar --output_dir runs/ib --resolution 16
    torchrun --nproc_per_node=2 examples/ffhq_diffusion/train.py --resolution 16 \\
        --shards 'data/shards/train-{000000..000003}.tar' --output_dir runs/ddp
    accelerate launch --multi_gpu --num_processes 8 examples/ffhq_diffusion/train.py \\
        --shards 's3://bucket/ffhq64/train-{000000..000127}.tar' --dataset_size 64000 \\
        --heldout 's3://bucket/ffhq64/heldout-{000000..000005}.tar' \\
        --output_dir s3://bucket/runs/ffhq64 --resolution 64 --model small \\
        --train_batch_size 64 --learning_rate 2e-4 --num_epochs 100 --mixed_precision bf16 \\
        --use_ema --random_flip --dataloader_num_workers 8 --checkpointing_steps 2000 \\
        --checkpoints_total_limit 3 --logger tensorboard
    # latent diffusion at 256 px: the same, with --resolution 256 --vae stabilityai/sd-vae-ft-mse

What InfoBatch adds to the loop: ``ib.stage()`` right after the tar reader (pruned samples are
never decoded), ``ib.epochs()`` (resumes at the store's first uncommitted epoch),
``ib.bound(loader)`` (the same number of steps on every process) and ``ib.update(...)`` (records
each sample's loss, returns the weighted mean to backpropagate). ``--no_prune`` runs the very
same code with ``prune_ratio=0``: the baseline.

Each epoch is committed to the score store, then checkpointed (``accelerate.save_state``:
model, optimizer, EMA; and ``training_state.json``: ``ib.state_dict()``, the step, the log);
also every ``--checkpointing_steps`` optimizer steps. ``--resume_from_checkpoint latest``
continues from the newest complete checkpoint. At the end ``--output_dir`` holds the pipeline
(``save_pretrained``), ``samples.png``, ``curves.png`` and ``summary.json``.
``--output_dir`` and ``--store`` may be local or any fsspec URL; S3 credentials and endpoint
come from the AWS variables or ``--storage_option key=value``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import itertools
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration
from checkpoints import OutputDir, load_checkpoint, save_checkpoint, strict_json, update_checkpoint
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    LDMPipeline,
    UNet2DModel,
)
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

import infobatch_stream as ibs
from infobatch_stream.storage import storage_option

MODELS = {  # block_out_channels, layers_per_block, attention at the lowest resolution
    "tiny": ((32, 64, 64), 1, False),
    "small": ((64, 128, 128, 256), 2, True),
    "base": ((128, 128, 256, 256, 512, 512), 2, True),   # DDPM's 256x256 UNet, as in diffusers
}
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                 "constant_with_warmup")
EVAL_NOISE_SEED = 20240607   # the held-out noise and the samples' noise: the same for every run


@dataclass
class Run:
    """Everything the named steps below share: the run's parts and its progress."""

    args: argparse.Namespace
    accelerator: Accelerator
    out: OutputDir
    ib: ibs.InfoBatch
    model: torch.nn.Module
    optimizer: Any
    noise_scheduler: DDPMScheduler
    schedule: EpochSchedule
    ema: EMAModel | None
    vae: AutoencoderKL | None
    dataset_size: int
    global_step: int = 0
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    checkpointed_at: int | None = None   # the step of the last checkpoint this process saved
    stopped: bool = False                # --max_train_steps reached

    def log(self, *parts: Any) -> None:
        self.accelerator.print(*parts, flush=True)


# -- the LR schedule, clocked in epochs ---------------------------------------------------

class EpochSchedule:
    """diffusers' ``get_scheduler``, read at each step's position in epochs.

    The position is ``epoch + fraction of the epoch done``, measured in the optimizer steps of
    a full epoch, so the schedule reaches its end at the last epoch's end however much pruning
    removed (a schedule counted in the baseline's steps would leave a pruned run at a fraction
    of its peak LR; one counted by ``ib.plan_steps`` must guess the saving before any score
    exists). Warmup (``--lr_warmup_steps``) that fits in epoch 0, which prunes nothing, lasts
    exactly that many optimizer steps. A resumed run needs no scheduler state.

    >>> schedule = EpochSchedule("cosine", optimizer, 500, 100, 1000)   # doctest: +SKIP
    >>> schedule.set(epoch=99, fraction=0.999)    # the LR near the schedule's end, ~0
    """

    def __init__(self, name: str, optimizer, warmup_steps: int, num_epochs: int,
                 full_epoch_steps: int):
        self.optimizer = optimizer
        self.full_epoch_steps = max(1, full_epoch_steps)
        self.scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps,
                                       num_training_steps=num_epochs * self.full_epoch_steps)

    def set(self, epoch: int, fraction: float) -> float:
        position = (epoch + min(max(fraction, 0.0), 1.0)) * self.full_epoch_steps
        for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                       self.scheduler.lr_lambdas, strict=True):
            group["lr"] = base * factor(position)
        return self.optimizer.param_groups[0]["lr"]


# -- data ---------------------------------------------------------------------------------

def shard_urls(pattern: str) -> list[str]:
    return list(wds.shardlists.expand_urls(pattern))


def check_shard_split(shards: int, processes: int, workers: int, allow: bool) -> str | None:
    """Refuse shards that do not split evenly over processes x DataLoader workers.

    webdataset gives each process whole shards (``split_by_node``), then each worker whole
    shards of those. ``ib.bound`` stops every process when the first runs out, so shards that
    are not a multiple of the processes silently skip part of every epoch; not a multiple of
    the workers, the end of each epoch is read by fewer workers. Returns the warning to give
    when ``allow``; raises SystemExit otherwise.
    """
    readers = processes * max(1, workers)
    if shards % readers == 0:
        return None
    fewest = shards // processes   # split_by_node gives process r the shards r, r+P, ...
    skipped = 1 - fewest * processes / shards if shards >= processes else 1.0
    message = (f"--shards has {shards} shards for {processes} processes x {max(1, workers)} "
               f"DataLoader workers = {readers} readers. ")
    if shards % processes:
        message += (f"The processes would hold {fewest} to {fewest + 1} shards each, and "
                    f"ib.bound() stops them all when the first runs out: about "
                    f"{100 * skipped:.1f}% of every epoch would be skipped. ")
    else:
        message += ("The workers would hold different numbers of shards: the end of each "
                    "epoch is read by fewer of them, and each drops its last incomplete batch. ")
    message += (f"Write the shards in a multiple of {readers} (make_shards.py --shard-size), "
                f"or change --dataloader_num_workers")
    if allow:
        return message
    raise SystemExit(message + ", or pass --allow_uneven_shards to train anyway")


def resize_uint8(image: torch.Tensor, size: int) -> torch.Tensor:
    """A decoded CHW uint8 image, resized to ``size`` x ``size`` if it is not (shards written
    with ``make_shards.py --resize`` already are); it stays uint8, 4x lighter to move."""
    if image.shape[-2:] == (size, size):
        return image
    resized = F.interpolate(image[None].float(), size=(size, size), mode="bilinear",
                            antialias=True, align_corners=False)[0]
    return resized.round().clamp(0, 255).to(torch.uint8)


def build_loader(args: argparse.Namespace, ib: ibs.InfoBatch, first_epoch: int,
                 pin_memory: bool) -> wds.WebLoader:
    """The training loader, built once: the pruning stage right after the tar reader.

    The shuffles are seeded by (seed, epoch) (``detshuffle`` counts the epochs it is iterated,
    from ``first_epoch``), so a resumed run reads each epoch in the order an uninterrupted one
    would; the stage reads the epoch to prune from the store, so persistent workers need
    nothing passed to them.
    """
    urls = shard_urls(args.shards)
    seed, before = args.seed * 1_000_003, first_epoch - 1
    dataset = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_node, wds.split_by_worker,
        wds.detshuffle(len(urls), seed=seed, epoch=before),
        wds.tarfile_to_samples(),
        ib.stage(),                                    # before decode: pruned = never decoded
        wds.detshuffle(args.shuffle_buffer, seed=seed, epoch=before),
        wds.decode("torchrgb8"),
        wds.to_tuple("png;jpg;jpeg", "__key_hash__", "__weight__"),
        wds.map_tuple(functools.partial(resize_uint8, size=args.resolution), None, None),
        wds.batched(args.train_batch_size, partial=False),
    )
    workers = args.dataloader_num_workers
    return wds.WebLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                         persistent_workers=workers > 0)


def count_samples(pattern: str, accelerator: Accelerator) -> int:
    """The samples in the shards: each process counts its own (``split_by_node``), once."""
    mine = sum(1 for _ in wds.WebDataset(shard_urls(pattern), shardshuffle=False,
                                         nodesplitter=wds.split_by_node, empty_check=False))
    return int(accelerator.reduce(torch.tensor(mine, device=accelerator.device), reduction="sum"))


# -- model --------------------------------------------------------------------------------

def build_vae(args: argparse.Namespace, device: torch.device) -> AutoencoderKL | None:
    """``--vae``: a frozen AutoencoderKL (a local folder or a Hub id), or None (pixel space)."""
    if not args.vae:
        return None
    subfolder = "vae" if os.path.isdir(os.path.join(args.vae, "vae")) else None
    try:
        vae = AutoencoderKL.from_pretrained(args.vae, subfolder=subfolder)
    except OSError:   # a Hub pipeline id (stabilityai/stable-diffusion-2) keeps its VAE in vae/
        vae = AutoencoderKL.from_pretrained(args.vae, subfolder="vae")
    if vae.config.shift_factor is not None:
        raise SystemExit(f"--vae {args.vae} has a shift_factor: its latents need a shift the "
                         f"saved LDMPipeline does not apply; use a VAE without one "
                         f"(e.g. stabilityai/sd-vae-ft-mse)")
    return vae.requires_grad_(False).eval().to(device)


def build_model(args: argparse.Namespace, vae: AutoencoderKL | None) -> UNet2DModel:
    """The UNet, in pixel space or on the VAE's latents (its channels and its size)."""
    channels, layers, attention = MODELS[args.model]
    if args.block_out_channels:
        channels = tuple(int(c) for c in args.block_out_channels.split(","))
    down, up = ["DownBlock2D"] * len(channels), ["UpBlock2D"] * len(channels)
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    in_channels, size = 3, args.resolution
    if vae is not None:
        in_channels, factor = vae.config.latent_channels, 2 ** (len(vae.config.block_out_channels) - 1)
        if args.resolution % factor:
            raise SystemExit(f"--resolution {args.resolution} is not a multiple of {factor}, the "
                             f"factor by which --vae {args.vae} downsamples")
        size = args.resolution // factor
    return UNet2DModel(sample_size=size, in_channels=in_channels, out_channels=in_channels,
                       layers_per_block=layers, block_out_channels=channels,
                       down_block_types=tuple(down), up_block_types=tuple(up),
                       norm_num_groups=min(32, channels[0] // 4))


def register_ema_hooks(accelerator: Accelerator, ema: EMAModel) -> None:
    """The EMA weights go in each checkpoint as ``unet_ema/`` (``save_pretrained``: safetensors
    and JSON, as diffusers' own example keeps them), and come back with ``load_state``."""
    def save(models, weights, output_dir):
        if accelerator.is_main_process:
            ema.save_pretrained(os.path.join(output_dir, "unet_ema"))

    def load(models, input_dir):
        saved = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), model_cls=UNet2DModel)
        ema.load_state_dict(saved.state_dict())
        ema.to(accelerator.device)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


# -- one step ------------------------------------------------------------------------------

def model_input(run: Run, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 images -> [-1, 1] on the device, flipped at random, encoded to scaled latents."""
    device = run.accelerator.device
    x = images.to(device, non_blocking=True).float().div_(127.5).sub_(1)
    if run.args.random_flip:
        flip = torch.rand(len(x), device=device, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if run.vae is None:
        return x
    with torch.no_grad(), run.accelerator.autocast():
        latents = run.vae.encode(x).latent_dist.sample(generator=generator)
    return latents.float() * run.vae.config.scaling_factor


def per_sample_loss(run: Run, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each sample's denoising MSE (mean over C, H, W), in float32 whatever the autocast."""
    scheduler = run.noise_scheduler
    noise = torch.randn(x0.shape, device=x0.device, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), device=x0.device,
                      generator=generator)
    prediction = run.model(scheduler.add_noise(x0, noise, t), t).sample
    target = noise if run.args.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def train_one_epoch(run: Run, loader: wds.WebLoader, epoch: int) -> dict:
    """One epoch of ``ib.bound(loader)`` and ``ib.update(...)``; returns this process's figures.

    The noise, timesteps and flips come from a generator on the device seeded by (seed, epoch,
    process), so a re-run epoch draws the same; nothing here waits for the device.
    """
    a, args = run.accelerator, run.args
    run.model.train()
    planned = run.ib.plan(run.dataset_size)           # exact: from the committed snapshot
    per_step = args.train_batch_size * a.num_processes * args.gradient_accumulation_steps
    planned_steps = max(1, planned.samples // per_step)
    generator = torch.Generator(a.device).manual_seed(
        (args.seed * 1_000_003 + epoch) * 1009 + a.process_index)
    loss_sum = torch.zeros((), device=a.device)
    micro = steps = 0
    # The same number of optimizer steps on every process, each epoch ending on a step boundary.
    for images, keys, weights in run.ib.bound(loader, args.gradient_accumulation_steps):
        with a.accumulate(run.model):
            losses = per_sample_loss(run, model_input(run, images, generator), generator)
            loss = run.ib.update(losses, keys, weights.to(a.device, non_blocking=True))
            a.backward(loss)
            if a.sync_gradients:
                a.clip_grad_norm_(run.model.parameters(), args.max_grad_norm)
                run.schedule.set(epoch, steps / planned_steps)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        loss_sum += losses.detach().sum()
        micro += 1
        if a.sync_gradients:
            steps += 1
            after_optimizer_step(run, epoch)
            if run.stopped:
                break
    return {"planned": planned, "micro_batches": micro, "steps": steps, "loss_sum": loss_sum}


def after_optimizer_step(run: Run, epoch: int) -> None:
    """EMA, the step-count checkpoint, and the ``--max_train_steps`` cap."""
    run.global_step += 1
    if run.ema is not None:
        run.ema.step(run.model.parameters())
    if run.global_step % run.args.checkpointing_steps == 0:
        checkpoint(run, epoch, end_of_epoch=False)
    if run.args.max_train_steps and run.global_step >= run.args.max_train_steps:
        run.stopped = True


# -- evaluation and outputs ----------------------------------------------------------------

@contextlib.contextmanager
def eval_weights(run: Run) -> Iterator[UNet2DModel]:
    """The unwrapped UNet in eval mode, holding the EMA weights (with ``--use_ema``) while in
    the block; the training weights and mode come back after it."""
    unet = run.accelerator.unwrap_model(run.model)
    if run.ema is not None:
        run.ema.store(unet.parameters())
        run.ema.copy_to(unet.parameters())
    unet.eval()
    try:
        yield unet
    finally:
        unet.train()
        if run.ema is not None:
            run.ema.restore(unet.parameters())


def load_heldout(run: Run) -> torch.Tensor | None:
    """The first ``--eval_images`` held-out samples (images never trained on), on the device:
    in [-1, 1], or their latents (the VAE's mean, scaled); main process only."""
    args = run.args
    if not args.heldout or not run.accelerator.is_main_process:
        return None
    dataset = (wds.WebDataset(shard_urls(args.heldout), shardshuffle=False, nodesplitter=None,
                              empty_check=False)
               .decode("torchrgb8").to_tuple("__key__", "png;jpg;jpeg"))
    samples = sorted(itertools.islice(dataset, args.eval_images), key=lambda s: s[0])
    images = torch.stack([resize_uint8(image, args.resolution) for _, image in samples])
    x = images.to(run.accelerator.device).float() / 127.5 - 1
    if run.vae is None:
        return x
    with torch.no_grad():
        return run.vae.encode(x).latent_dist.mode() * run.vae.config.scaling_factor


def heldout_loss(run: Run, heldout: torch.Tensor) -> float:
    """The held-out denoising loss of the model (EMA weights with ``--use_ema``)."""
    with eval_weights(run) as unet, run.accelerator.autocast():
        return fixed_noise_loss(unet, run.noise_scheduler, heldout, run.args.eval_timesteps,
                                run.args.prediction_type)


def fixed_noise_loss(unet: UNet2DModel, scheduler: DDPMScheduler, x0: torch.Tensor, bins: int,
                     prediction_type: str = "epsilon") -> float:
    """Mean denoising MSE of ``unet`` on ``x0`` (on its device) at ``bins`` fixed timesteps (the
    middle of each bin) and fixed noise, so two runs (or two epochs) are scored on exactly the
    same problems. ``bench/diffusion.py`` scores its arms with it too."""
    device = x0.device
    total_steps = scheduler.config.num_train_timesteps
    timesteps = ((torch.arange(bins) + 0.5) * total_steps / bins).long().to(device)
    generator = torch.Generator().manual_seed(EVAL_NOISE_SEED)   # CPU: the same on any device
    total = torch.zeros((), device=device)
    with torch.inference_mode():
        for t in timesteps:
            noise = torch.randn(x0.shape, generator=generator).to(device)
            for start in range(0, len(x0), 256):
                x, n = x0[start:start + 256], noise[start:start + 256]
                tt = t.expand(len(x))
                target = n if prediction_type == "epsilon" else scheduler.get_velocity(x, n, tt)
                prediction = unet(scheduler.add_noise(x, n, tt), tt).sample.float()
                total += F.mse_loss(prediction, target.float(), reduction="sum") / n[0].numel()
    return float(total) / (len(x0) * bins)


def pipeline(run: Run, unet: UNet2DModel, for_sampling: bool):
    """The diffusers pipeline of this model: DDPM (saved) or DDIM (samples) in pixel space; in
    latent space an LDMPipeline, which decodes ``latents / scaling_factor`` with the VAE."""
    config = run.noise_scheduler.config
    if run.vae is not None:
        return LDMPipeline(vqvae=run.vae, unet=unet, scheduler=DDIMScheduler.from_config(config))
    if for_sampling:
        return DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(config))
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(config))


def generate(run: Run) -> np.ndarray:
    """``--eval_batch_size`` samples (NHWC in [0, 1]) from fixed noise, with the EMA weights."""
    with eval_weights(run) as unet:
        sampler = pipeline(run, unet, for_sampling=True)
        sampler.set_progress_bar_config(disable=True)
        return sampler(batch_size=run.args.eval_batch_size, output_type="np",
                       generator=torch.Generator().manual_seed(EVAL_NOISE_SEED),
                       num_inference_steps=run.args.num_inference_steps).images


def image_grid_png(images: np.ndarray, scale: int) -> bytes:
    """NHWC images in [0, 1] -> one PNG grid, each pixel ``scale`` x ``scale``."""
    from PIL import Image

    n, size = len(images), images.shape[1]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * size, cols * size, 3), 255, np.uint8)
    for i, image in enumerate((images * 255).round().astype(np.uint8)):
        r, c = divmod(i, cols)
        grid[r * size:(r + 1) * size, c * size:(c + 1) * size] = image
    picture = Image.fromarray(grid).resize((cols * size * scale, rows * size * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def save_samples(run: Run, name: str, epoch: int) -> None:
    """Samples as a PNG grid in ``--output_dir`` and as images in the tracker (main only)."""
    if not run.accelerator.is_main_process:
        return
    images = generate(run)
    run.out.write(name, image_grid_png(images, scale=max(1, 96 // images.shape[1])))
    if run.args.logger == "tensorboard":
        writer = run.accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_images("samples", images.transpose(0, 3, 1, 2), epoch)


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
    left.set_ylabel("denoising MSE")
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


# -- epochs, checkpoints, the end ------------------------------------------------------------

def training_state(run: Run, epoch: int, end_of_epoch: bool) -> dict:
    """What ``training_state.json`` holds beside accelerate's files (strict JSON)."""
    return {"global_step": run.global_step, "epoch": epoch, "end_of_epoch": end_of_epoch,
            "infobatch": run.ib.state_dict(), "history": run.history,
            "train_seconds": run.train_seconds}


def checkpoint(run: Run, epoch: int, end_of_epoch: bool) -> str:
    """Collective: ``checkpoint-<global step>`` in ``--output_dir``, whole or not at all."""
    state = training_state(run, epoch, end_of_epoch)
    if run.checkpointed_at == run.global_step:   # the step's checkpoint, now with the epoch ended
        return update_checkpoint(run.accelerator, run.out, run.global_step, state)
    url = save_checkpoint(run.accelerator, run.out, run.global_step, state,
                          run.args.checkpoints_total_limit)
    run.checkpointed_at = run.global_step
    if not end_of_epoch:
        run.log(f"saved {url} (epoch {epoch}, mid-epoch)")
    return url


def resume(run: Run, options: dict) -> None:
    """``--resume_from_checkpoint``: model, optimizer and EMA (accelerate), then ``ib``'s state,
    the step and the log; training goes on at the store's first uncommitted epoch."""
    args, store_epoch = run.args, run.ib.epoch
    location = args.resume_from_checkpoint
    if location == "latest":
        location = run.out.latest()
    if location is None:
        if store_epoch > 0:
            why = (f"{run.out.url} holds no complete checkpoint" if args.resume_from_checkpoint
                   else "--resume_from_checkpoint was not given")
            raise SystemExit(
                f"the store {run.ib.store.url} already holds epochs 0..{store_epoch - 1}, but "
                f"{why}: pass --resume_from_checkpoint latest (or a checkpoint) to continue "
                f"that run, or a new --output_dir / --store to start another")
        if args.resume_from_checkpoint:
            run.log(f"--resume_from_checkpoint latest: no checkpoint in {run.out.url}; starting anew")
        return
    state = load_checkpoint(run.accelerator, run.out, location, options)
    run.ib.load_state_dict(state["infobatch"])
    run.global_step = run.checkpointed_at = state["global_step"]
    run.history, run.train_seconds = state["history"], state["train_seconds"]
    run.log(f"resumed from {location} (step {run.global_step}, "
            f"{'end' if state['end_of_epoch'] else 'middle'} of epoch {state['epoch']}); "
            f"continuing at epoch {run.ib.epoch}, the store's first uncommitted epoch")


def end_of_epoch(run: Run, epoch: int, figures: dict, heldout: torch.Tensor | None,
                 seconds: float, cpu_seconds: float) -> dict:
    """While the epoch's commit runs: the epoch's figures over all processes, evaluation and
    samples; then, the commit done (``ib.metrics()`` waits for it), the checkpoint and the log."""
    a, args = run.accelerator, run.args
    loss_sum = float(a.reduce(figures["loss_sum"], reduction="sum"))   # one read per epoch
    trained = figures["micro_batches"] * args.train_batch_size * a.num_processes
    pruned = run.dataset_size - figures["planned"].samples
    pruned_so_far = pruned + sum(h["pruned"] for h in run.history)
    started = time.perf_counter()
    held = heldout_loss(run, heldout) if heldout is not None else None
    if (epoch + 1) % args.save_images_epochs == 0 and epoch + 1 < args.num_epochs:
        save_samples(run, f"samples/epoch-{epoch:04d}.png", epoch)
    a.wait_for_everyone()
    run.train_seconds += seconds
    record = {
        "epoch": epoch, "trained": trained, "pruned": pruned, "steps": figures["steps"],
        "micro_batches": figures["micro_batches"], "dataset_size": run.dataset_size,
        "cumulative_saving": pruned_so_far / (run.dataset_size * (len(run.history) + 1)),
        "train_loss": loss_sum / max(1, trained), "heldout_loss": held,
        "lr": run.optimizer.param_groups[0]["lr"], "seconds": seconds, "cpu_seconds": cpu_seconds,
        "eval_seconds": time.perf_counter() - started, "threshold": figures["planned"].rule.threshold,
        "global_step": run.global_step,
    }
    record["infobatch"] = run.ib.metrics()   # waits for the commit: kept, pruned, timings
    run.history.append(record)
    url = checkpoint(run, epoch, end_of_epoch=True)
    a.log(numbers(record), step=run.global_step)
    run.log(f"epoch {epoch:3d}/{args.num_epochs}  trained {trained:6d}  pruned {pruned:6d} "
            f"({100 * pruned / run.dataset_size:4.1f}%)  saved so far "
            f"{100 * record['cumulative_saving']:4.1f}%  train loss {record['train_loss']:.4f}  "
            f"held-out {'-' if held is None else f'{held:.4f}'}  lr {record['lr']:.2e}  "
            f"{seconds:5.1f}s (+{record['eval_seconds']:.1f}s eval, "
            f"{1000 * record['infobatch']['blocking_seconds']:.0f} ms blocked by the commit)  "
            f"[{os.path.basename(url)}]")
    return record


def numbers(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a (nested) record, for a tracker: ``{"infobatch/mean_score": 0.1, ...}``."""
    flat: dict[str, float] = {}
    for name, value in record.items():
        if isinstance(value, dict):
            flat.update(numbers(value, f"{prefix}{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[prefix + name] = value
    return flat


def summarize(run: Run) -> dict:
    args, history = run.args, run.history
    epochs_done = max(1, len(history))
    return {
        "mode": "baseline" if args.no_prune else args.policy, "seed": args.seed,
        "epochs": args.num_epochs, "dataset_size": run.dataset_size,
        "lr_scheduler": args.lr_scheduler, "latent": run.vae is not None,
        "processes": run.accelerator.num_processes,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "mixed_precision": args.mixed_precision, "use_ema": args.use_ema,
        "global_step": run.global_step, "stopped_early": run.stopped,
        "steps": sum(h["steps"] for h in history),
        "trained": sum(h["trained"] for h in history),
        "pruned": sum(h["pruned"] for h in history),
        "saving": sum(h["pruned"] for h in history) / (run.dataset_size * epochs_done),
        "final_heldout_loss": history[-1]["heldout_loss"] if history else None,
        "train_seconds": run.train_seconds,
        "train_cpu_seconds": sum(h["cpu_seconds"] for h in history), "history": history,
    }


def finish(run: Run) -> dict:
    """The final samples, curves, pipeline (``save_pretrained``, EMA weights with
    ``--use_ema``), logs and summary in ``--output_dir``."""
    summary, out, args = summarize(run), run.out, run.args
    if run.accelerator.is_main_process:
        save_samples(run, "samples.png", args.num_epochs)
        title = "baseline (no pruning)" if args.no_prune else \
            f"{'InfoBatch' if args.policy == 'infobatch' else 'random pruning'} (r={args.prune_ratio})"
        if run.history:
            out.write("curves.png", curves_png(run.history, f"{title}, seed {args.seed}"))
        with eval_weights(run) as unet:
            pipeline(run, unet, for_sampling=False).save_pretrained(out.local)
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()   # closes the trackers: their files are whole now
    if run.accelerator.is_main_process:
        for name in ("model_index.json", "unet", "scheduler", "vqvae", args.logging_dir):
            if os.path.exists(out.local_path(name)):
                out.publish(name)
        out.write("summary.json", strict_json(summary))
        run.log(f"done: {summary['trained']} samples trained in {summary['steps']} steps, "
                f"{100 * summary['saving']:.1f}% pruned, final held-out loss "
                f"{summary['final_heldout_loss']}, {run.train_seconds:.1f}s training; wrote the "
                f"pipeline, samples.png, curves.png and summary.json to {out.url}")
    return summary


# -- setting up ------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    add_data_arguments(p)
    add_training_arguments(p)
    add_model_arguments(p)
    add_output_arguments(p)
    return p.parse_args(argv)


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("data and outputs")
    data.add_argument("--shards", required=True, help="training shards: a file, brace pattern or URL")
    data.add_argument("--heldout", default=None, help="held-out shards (images not in --shards)")
    data.add_argument("--dataset_size", type=int, default=None,
                      help="samples in --shards (counted with one pass over them if left out)")
    data.add_argument("--output_dir", default="ddpm-ffhq", help="checkpoints, samples, pipeline: "
                      "a folder or fsspec URL (s3://...)")
    data.add_argument("--staging_dir", default=None, help="with a remote --output_dir: the local "
                      "folder checkpoints and logs are written in before upload (default: a temp dir)")
    data.add_argument("--store", default=None, help="score store URL (default: OUTPUT_DIR/scores)")
    data.add_argument("--storage_option", action="append", default=[], metavar="KEY=VALUE",
                      type=storage_option, help="fsspec option for the shards, the store and "
                      "--output_dir (repeatable)")
    data.add_argument("--resolution", type=int, default=64)
    data.add_argument("--random_flip", action="store_true", help="random horizontal flips")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="per process")
    data.add_argument("--allow_uneven_shards", action="store_true", help="train even when the "
                      "shards are not a multiple of processes x workers (warns what it costs)")
    data.add_argument("--shuffle_buffer", type=int, default=1000)


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    train = p.add_argument_group("training (the flags of diffusers' train_unconditional.py)")
    train.add_argument("--num_epochs", type=int, default=100)
    train.add_argument("--train_batch_size", type=int, default=16, help="per process")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--learning_rate", type=float, default=1e-4)
    train.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="cosine",
                       help="diffusers' get_scheduler, clocked in epochs (see EpochSchedule)")
    train.add_argument("--lr_warmup_steps", type=int, default=500, help="optimizer steps")
    train.add_argument("--adam_beta1", type=float, default=0.95)
    train.add_argument("--adam_beta2", type=float, default=0.999)
    train.add_argument("--adam_weight_decay", type=float, default=1e-6)
    train.add_argument("--adam_epsilon", type=float, default=1e-8)
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    train.add_argument("--use_ema", action="store_true")
    train.add_argument("--ema_inv_gamma", type=float, default=1.0)
    train.add_argument("--ema_power", type=float, default=3 / 4)
    train.add_argument("--ema_max_decay", type=float, default=0.9999)
    train.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], default="epsilon")
    train.add_argument("--ddpm_num_steps", type=int, default=1000)
    train.add_argument("--ddpm_beta_schedule", default="squaredcos_cap_v2")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--max_train_steps", type=int, default=None, help="stop after this many "
                       "optimizer steps (a smoke test: the epoch in progress is not committed)")
    train.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    model = p.add_argument_group("model and pruning")
    model.add_argument("--model", choices=sorted(MODELS), default="tiny")
    model.add_argument("--block_out_channels", default=None, help="override, e.g. 32,64,64")
    model.add_argument("--vae", default=None, help="latent diffusion: an AutoencoderKL (folder "
                       "or Hub id, e.g. stabilityai/sd-vae-ft-mse)")
    model.add_argument("--prune_ratio", type=float, default=0.5)
    model.add_argument("--delta", type=float, default=0.875)
    model.add_argument("--policy", choices=["infobatch", "random"], default="infobatch")
    model.add_argument("--no_prune", action="store_true",
                       help="the baseline: the same loop and stage with prune_ratio=0")


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    keep = p.add_argument_group("checkpoints, samples, logs")
    keep.add_argument("--checkpointing_steps", type=int, default=500)
    keep.add_argument("--checkpoints_total_limit", type=int, default=None)
    keep.add_argument("--resume_from_checkpoint", default=None,
                      help="'latest', a checkpoint-<step> name in --output_dir, or its path/URL")
    keep.add_argument("--save_images_epochs", type=int, default=10)
    keep.add_argument("--eval_batch_size", type=int, default=16, help="samples generated")
    keep.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps for samples")
    keep.add_argument("--eval_images", type=int, default=256, help="held-out images scored")
    keep.add_argument("--eval_timesteps", type=int, default=8)
    keep.add_argument("--logger", choices=["tensorboard", "wandb", "none"], default="tensorboard")
    keep.add_argument("--logging_dir", default="logs", help="under the (staging) output folder")


def setup(args: argparse.Namespace) -> tuple[Accelerator, OutputDir, dict]:
    """The Accelerator, ``--output_dir`` and the fsspec options; refuses an uneven shard split."""
    if args.threads:
        torch.set_num_threads(args.threads)
    options = dict(args.storage_option)
    for url in filter(None, (args.shards, args.heldout)):
        if options and "://" in url:   # the shards are opened by webdataset, in the workers
            ibs.set_shard_storage_options(url.split("://", 1)[0], **options)
    out = OutputDir(args.output_dir, options, args.staging_dir)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        # Without a GPU, accelerate runs torchrun's processes as independent jobs unless told cpu.
        cpu=args.cpu or (launched > 1 and not torch.cuda.is_available()),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.logger == "none" else args.logger,
        project_config=ProjectConfiguration(project_dir=out.local,
                                            logging_dir=out.local_path(args.logging_dir)))
    if accelerator.num_processes != launched:
        raise SystemExit(f"launched as {launched} processes, but accelerate sees "
                         f"{accelerator.num_processes}: check the launcher's environment")
    warning = check_shard_split(len(shard_urls(args.shards)), accelerator.num_processes,
                                args.dataloader_num_workers, args.allow_uneven_shards)
    if warning:
        accelerator.print(f"WARNING: {warning}", flush=True)
    return accelerator, out, options


def build_run(args: argparse.Namespace, accelerator: Accelerator, out: OutputDir, ib: ibs.InfoBatch,
              dataset_size: int) -> Run:
    """Model (and VAE), optimizer, EMA and LR schedule, prepared by accelerate."""
    torch.manual_seed(args.seed)   # the model's init; the training noise has its own generator
    vae = build_vae(args, accelerator.device)
    model = build_model(args, vae)
    noise_scheduler = DDPMScheduler(num_train_timesteps=args.ddpm_num_steps,
                                    beta_schedule=args.ddpm_beta_schedule,
                                    prediction_type=args.prediction_type)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate,
                                  betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    ema = None
    if args.use_ema:
        ema = EMAModel(model.parameters(), decay=args.ema_max_decay, use_ema_warmup=True,
                       inv_gamma=args.ema_inv_gamma, power=args.ema_power,
                       model_cls=UNet2DModel, model_config=model.config)
        ema.to(accelerator.device)
        register_ema_hooks(accelerator, ema)
    per_step = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    schedule = EpochSchedule(args.lr_scheduler, optimizer, args.lr_warmup_steps, args.num_epochs,
                             dataset_size // per_step)
    model, optimizer = accelerator.prepare(model, optimizer)
    return Run(args, accelerator, out, ib, model, optimizer, noise_scheduler, schedule, ema, vae,
               dataset_size)


def main(argv: list[str] | None = None) -> dict:
    """Train; returns the run's summary (also written to OUTPUT_DIR/summary.json).

    >>> main(["--shards", "data/train-{000000..000003}.tar", "--max_train_steps", "5"])  # doctest: +SKIP
    """
    args = parse_args(argv)
    accelerator, out, options = setup(args)
    ib = ibs.InfoBatch(args.store or out.url_of("scores"), num_epochs=args.num_epochs,
                       prune_ratio=0.0 if args.no_prune else args.prune_ratio, delta=args.delta,
                       seed=args.seed, storage_options=options or None, policy=args.policy)
    dataset_size = args.dataset_size or count_samples(args.shards, accelerator)
    run = build_run(args, accelerator, out, ib, dataset_size)
    accelerator.init_trackers("ffhq_diffusion")
    resume(run, options)
    loader = build_loader(args, ib, first_epoch=ib.epoch,
                          pin_memory=accelerator.device.type == "cuda")
    heldout = load_heldout(run)
    announce(run)

    for epoch in ib.epochs():                           # resumes from the store after a restart
        started, cpu_started = time.perf_counter(), time.process_time()
        figures = train_one_epoch(run, loader, epoch)   # ib.bound(loader), ib.update(...)
        if run.stopped:
            break                                       # leaving early commits nothing
        ib.end_epoch(wait=False)                        # every process flushes; the commit
        end_of_epoch(run, epoch, figures, heldout, time.perf_counter() - started,
                     time.process_time() - cpu_started)
    try:
        return finish(run)
    finally:
        AcceleratorState._reset_state()   # main() may be called again in this process


def announce(run: Run) -> None:
    args, a = run.args, run.accelerator
    what = ("baseline (no pruning)" if args.no_prune else
            f"InfoBatch r={args.prune_ratio} delta={args.delta} policy={args.policy}")
    params = sum(p.numel() for p in a.unwrap_model(run.model).parameters()) / 1e6
    space = f"latents of {args.vae}" if run.vae is not None else "pixels"
    run.log(f"{what}: {run.dataset_size} samples, {args.num_epochs} epochs, batch "
            f"{args.train_batch_size} x {a.num_processes} ranks x "
            f"{args.gradient_accumulation_steps} accumulation, model {args.model} ({params:.2f}M "
            f"params), {args.resolution}px {space}, "
            f"{'fp32' if args.mixed_precision == 'no' else args.mixed_precision}, "
            f"{'EMA, ' if args.use_ema else ''}store {run.ib.store.url}, output {run.out.url}")


if __name__ == "__main__":
    main()

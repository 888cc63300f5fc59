"""Does InfoBatch pay off for diffusion once training has converged? Full data against pruning.

A DDPM (diffusers' ``UNet2DModel`` + ``DDPMScheduler``, as ``examples/ffhq_diffusion``) on
procedural faces (``faces.py``, nothing downloaded), written as webdataset tar shards
(``make_shards.py``) and read through ``InfoBatch.stage()`` exactly as a user's loop would.
Arms, at equal epochs unless said, each over the same seeds:

- ``full``: all data every epoch (the same pipeline with ``prune_ratio=0``);
- ``infobatch``: r=0.5, delta=0.875, the per-sample loss as the score;
- ``infobatch_timestep``: the same, scored by ``TimestepNormalizer`` (the loss over the mean
  loss at its timestep, blended with the sample's previous score);
- ``random``: ``policy="random"``, InfoBatch's budget drawn uniformly;
- ``full_short``: all data for fewer epochs, as many sample visits as ``infobatch`` trained
  (what a user could do instead of pruning).

The LR warms up, then follows a cosine to 0 counted in each arm's own epochs, so every arm
ends its schedule. After each epoch: the held-out denoising loss (noise-prediction MSE on
faces never trained on, at fixed timesteps with fixed noise, as ``train.py`` scores it).
Each (arm, seed) result is cached under ``--workdir``: a killed run continues where it was.
The plateau criterion is computed from the ``full`` arm's own curves, not assumed.

    python bench/diffusion.py --quick --out /tmp/diffusion.json       # < 5 min on 2 cores
    python bench/diffusion.py --out docs/diffusion.json --plot docs/diffusion-curves.png
    python bench/diffusion.py --device cuda --jobs 5 --out diffusion-gpu.json   # arms in parallel
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import webdataset as wds

import infobatch_stream as ibs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples", "ffhq_diffusion"))

import faces  # noqa: E402 (found through the sys.path entry above)
import make_shards  # noqa: E402 (found through the sys.path entry above)
from train import fixed_noise_loss  # noqa: E402 (found through the sys.path entry above)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from diffusion_summary import plot, summarize  # noqa: E402 (found through the sys.path entry above)

TIMESTEPS = 1000
ARMS = {
    "full": {"prune_ratio": 0.0},
    "infobatch": {"policy": "infobatch"},
    "infobatch_timestep": {"policy": "infobatch", "score": "timestep"},
    "random": {"policy": "random"},
    "full_short": {"prune_ratio": 0.0, "matched_to": "infobatch"},
}


@dataclass(frozen=True)
class Regime:
    """Everything that decides a run's numbers (its hash names the cache)."""

    train_images: int
    heldout_images: int
    image_size: int
    channels: tuple[int, ...]
    batch_size: int
    epochs: int
    lr: float
    seeds: int
    warmup: float = 1.0             # epochs of linear warmup
    draw_size: int = 32             # faces are drawn at this size, then resized
    eval_timesteps: int = 8
    eval_every: int = 1             # epochs between held-out evaluations (and always the last)
    prune_ratio: float = 0.5
    delta: float = 0.875
    norm_buckets: int = 20
    norm_smoothing: float = 0.5

    def key(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
                              ).hexdigest()[:12]


REGIMES = {
    "full": Regime(train_images=128, heldout_images=256, image_size=8, channels=(16, 32),
                   batch_size=16, epochs=400, lr=3e-3, seeds=3, warmup=2.0, eval_every=8,
                   norm_buckets=10),
    "quick": Regime(train_images=128, heldout_images=64, image_size=8, channels=(16, 32),
                    batch_size=16, epochs=24, lr=3e-3, seeds=3, warmup=2.0, eval_every=4,
                    norm_buckets=10),
}


# -- data ---------------------------------------------------------------------------------

@dataclass
class Data:
    shards: list[str]
    size: int
    heldout: torch.Tensor


def to_model_range(image: torch.Tensor, size: int) -> torch.Tensor:
    """A decoded CHW float image in [0, 1] -> ``size`` x ``size`` in [-1, 1]."""
    if image.shape[-2:] != (size, size):
        image = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False)[0]
    return image * 2 - 1


def heldout_loss(model: torch.nn.Module, scheduler, data: Data, regime: Regime,
                 device: torch.device) -> float:
    """The held-out denoising loss at fixed timesteps and noise, as ``train.py`` scores it."""
    model.eval()
    try:
        return fixed_noise_loss(model, scheduler, data.heldout.to(device), regime.eval_timesteps)
    finally:
        model.train()


def prepare_data(regime: Regime, workdir: str) -> Data:
    """Faces -> training and held-out shards under ``workdir`` (reused when already there)."""
    name = f"data-{regime.train_images}-{regime.heldout_images}-{regime.draw_size}-{regime.image_size}"
    root = os.path.join(workdir, name)
    if not os.path.exists(os.path.join(root, "done")):
        shutil.rmtree(root, ignore_errors=True)
        total = regime.train_images + regime.heldout_images
        faces.write_faces(os.path.join(root, "faces"), total, size=regime.draw_size, progress=False)
        for prefix, ids in (("train", (0, regime.train_images)),
                            ("heldout", (regime.train_images, total))):
            make_shards.write_shards(os.path.join(root, "faces"), os.path.join(root, "shards"),
                                     prefix, shard_size=128, resize=regime.image_size, ids=ids,
                                     progress=False)
        open(os.path.join(root, "done"), "w").close()
    shards = os.path.join(root, "shards")
    train = sorted(os.path.join(shards, f) for f in os.listdir(shards) if f.startswith("train-"))
    heldout = sorted(os.path.join(shards, f) for f in os.listdir(shards) if f.startswith("heldout-"))
    images = sorted(wds.WebDataset(heldout, shardshuffle=False, empty_check=False)
                    .decode("torchrgb").to_tuple("__key__", "png"), key=lambda s: s[0])
    held = torch.stack([to_model_range(image, regime.image_size) for _, image in images])
    return Data(train, regime.train_images, held)


def loader(data: Data, regime: Regime, ib: ibs.InfoBatch, seed: int, epoch: int,
           pin: bool) -> wds.WebLoader:
    """The epoch's batches: the stage right after the tar reader, then shuffle and decode."""
    order = seed * 1_000_003 + epoch
    shards = list(data.shards)
    random.Random(order).shuffle(shards)
    dataset = (wds.WebDataset(shards, shardshuffle=False, empty_check=False)
               .compose(ib.stage())
               .shuffle(data.size, initial=data.size, rng=random.Random(order))
               .decode("torchrgb")
               .to_tuple("png", "__key__", "__weight__", "__score__")
               .map_tuple(lambda image: to_model_range(image, regime.image_size), None, None, None)
               .batched(regime.batch_size)      # the last, partial batch too: every kept sample
               # tensors, not numpy arrays: pin_memory pins only tensors
               .map_tuple(None, None, torch.as_tensor, torch.as_tensor))
    return wds.WebLoader(dataset, batch_size=None, num_workers=0, pin_memory=pin)


# -- one training run ---------------------------------------------------------------------

def build_model(regime: Regime) -> torch.nn.Module:
    from diffusers import UNet2DModel

    levels = len(regime.channels)
    return UNet2DModel(sample_size=regime.image_size, in_channels=3, out_channels=3,
                       layers_per_block=1, block_out_channels=regime.channels,
                       down_block_types=("DownBlock2D",) * levels,
                       up_block_types=("UpBlock2D",) * levels,
                       norm_num_groups=min(32, regime.channels[0] // 4))


def learning_rate(regime: Regime, epochs: int, progress: float) -> float:
    """Warmup, then a cosine to 0 at the end of this arm's own ``epochs`` (fractional progress)."""
    warm = min(1.0, progress / regime.warmup) if regime.warmup > 0 else 1.0
    return regime.lr * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, progress / epochs)))


def evaluated(regime: Regime, epochs: int, epoch: int) -> bool:
    """Every ``eval_every`` epochs, the last, and the last before the plateau's window."""
    window = max(1, ibs.annealing_start(epochs, regime.delta))
    return (epoch + 1) % regime.eval_every == 0 or epoch in (epochs - 1, window - 1)


@dataclass
class Run:
    """What one training run holds while it trains."""

    regime: Regime
    data: Data
    epochs: int
    seed: int
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ib: ibs.InfoBatch
    normalizer: ibs.TimestepNormalizer | None
    yardstick: ibs.TimestepNormalizer   # every arm: the loss over its timestep's mean, unsmoothed


def spearman(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Rank correlation of the pairs where both are finite (None with fewer than 3)."""
    keep = torch.isfinite(x) & torch.isfinite(y)
    if int(keep.sum()) < 3:
        return None
    rx, ry = (v[keep].argsort().argsort().double() for v in (x, y))
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


def train_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """One epoch through the stage. Nothing of the benchmark's own on the step path waits for
    the device; ``ib.update`` still copies each batch's scores to the host."""
    regime, device = run.regime, run.device
    planned = max(1, math.ceil(run.ib.plan(run.data.size).samples / regime.batch_size))
    generator = torch.Generator(device=device).manual_seed(run.seed * 1_000_003 + epoch * 1009)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    trained = steps = 0
    last_scores, next_losses = [], []
    started, cpu_started = time.perf_counter(), time.process_time()
    batches = loader(run.data, regime, run.ib, run.seed, epoch, pin=device.type == "cuda")
    for images, keys, weights, previous in run.ib.bound(batches):
        images = images.to(device, non_blocking=True)
        flip = torch.rand(len(keys), generator=generator, device=device) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        noise = torch.randn(images.shape, generator=generator, device=device)
        t = torch.randint(0, TIMESTEPS, (len(keys),), generator=generator, device=device)
        pred = run.model(run.scheduler.add_noise(images, noise, t), t).sample
        per_sample = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        scores = None if run.normalizer is None else run.normalizer(per_sample, t, previous)
        last_scores.append(previous)
        next_losses.append(run.yardstick(per_sample, t))
        loss = run.ib.update(per_sample, keys, weights, scores=scores)
        for group in run.optimizer.param_groups:
            group["lr"] = learning_rate(regime, run.epochs, epoch + min(steps, planned - 1) / planned)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
        run.optimizer.step()
        loss_sum += per_sample.detach().sum()
        trained += len(keys)
        steps += 1
    for normalizer in filter(None, (run.normalizer, run.yardstick)):
        normalizer.sync()
    train_loss = float(loss_sum) / max(1, trained)     # one read per epoch
    # Does the score the stage pruned on predict how hard the image is at its next draw?
    persistence = spearman(torch.cat(last_scores).double().cpu(),
                           torch.cat(next_losses).double().cpu()) if steps else None
    return {"epoch": epoch, "trained": trained, "steps": steps, "train_loss": train_loss,
            "score_persistence": persistence,
            "seconds": time.perf_counter() - started,
            "cpu_seconds": time.process_time() - cpu_started}


def train_arm(regime: Regime, arm: str, seed: int, epochs: int, data: Data, store: str,
              device: torch.device) -> dict[str, Any]:
    """One (arm, seed) run from scratch; returns its per-epoch curve and totals."""
    from diffusers import DDPMScheduler

    settings = ARMS[arm]
    shutil.rmtree(store, ignore_errors=True)     # a killed attempt starts over
    torch.manual_seed(seed)
    model = build_model(regime).to(device)
    scheduler = DDPMScheduler(num_train_timesteps=TIMESTEPS, beta_schedule="squaredcos_cap_v2")
    ib = ibs.InfoBatch(store, num_epochs=epochs, seed=seed, delta=regime.delta,
                       prune_ratio=settings.get("prune_ratio", regime.prune_ratio),
                       policy=settings.get("policy", "infobatch"))
    normalizer = ibs.TimestepNormalizer(TIMESTEPS, buckets=regime.norm_buckets,
                                        smoothing=regime.norm_smoothing, warmup_steps=4) \
        if settings.get("score") == "timestep" else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=regime.lr, weight_decay=0.0)
    yardstick = ibs.TimestepNormalizer(TIMESTEPS, buckets=regime.norm_buckets, warmup_steps=4)
    run = Run(regime, data, epochs, seed, device, model, optimizer, scheduler, ib, normalizer,
              yardstick)
    history = []
    for epoch in ib.epochs():
        pruned = data.size - ib.plan(data.size).samples
        record = train_epoch(run, epoch)
        record["pruned"] = pruned
        record["heldout_loss"] = heldout_loss(model, scheduler, data, regime, device) \
            if evaluated(regime, epochs, epoch) else None
        history.append(record)
    return {"arm": arm, "seed": seed, "epochs": epochs,
            "final_heldout_loss": history[-1]["heldout_loss"],
            "trained": sum(h["trained"] for h in history),
            "steps": sum(h["steps"] for h in history),
            "train_seconds": sum(h["seconds"] for h in history),
            "train_cpu_seconds": sum(h["cpu_seconds"] for h in history),
            "history": history}


# -- the cache and the arms ---------------------------------------------------------------

def result_path(workdir: str, regime: Regime, arm: str, seed: int) -> str:
    return os.path.join(workdir, f"runs-{regime.key()}", f"{arm}-seed{seed}.json")


def write_json(path: str, value: Any) -> None:
    """Replace ``path`` whole: a kill mid-write leaves the old file or none, never half."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def cached(workdir: str, regime: Regime, arm: str, seed: int, epochs: int) -> dict | None:
    path = result_path(workdir, regime, arm, seed)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        result = json.load(f)
    return result if result["epochs"] == epochs else None


def run_one(regime: Regime, arm: str, seed: int, epochs: int, workdir: str,
            device: torch.device) -> dict[str, Any]:
    """Train (arm, seed) unless its result is cached; cache and return the result."""
    result = cached(workdir, regime, arm, seed, epochs)
    if result is not None:
        return result
    path = result_path(workdir, regime, arm, seed)
    store = path.removesuffix(".json") + "-store"
    result = train_arm(regime, arm, seed, epochs, prepare_data(regime, workdir), store, device)
    result["device"] = str(device)
    write_json(path, result)
    shutil.rmtree(store, ignore_errors=True)
    print(f"  {arm} seed {seed}: {epochs} epochs, held-out {result['final_heldout_loss']:.5f}, "
          f"{result['trained']} samples, {result['train_seconds']:.0f}s", file=sys.stderr,
          flush=True)
    return result


def worker_command(regime: Regime, arm: str, seed: int, epochs: int, workdir: str,
                   device: str, threads: int) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--worker", arm, str(seed), str(epochs),
            "--regime-json", json.dumps(dataclasses.asdict(regime)), "--workdir", workdir,
            "--device", device, "--threads", str(threads)]


def execute(tasks: list[tuple[str, int, int]], regime: Regime, workdir: str, device: str,
            jobs: int, threads: int) -> None:
    """Run the (arm, seed, epochs) not yet cached: in this process, or ``jobs`` processes."""
    todo = [task for task in tasks if cached(workdir, regime, *task) is None]
    if jobs <= 1:
        for arm, seed, epochs in todo:
            run_one(regime, arm, seed, epochs, workdir, torch.device(device))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    running: list[tuple[subprocess.Popen, tuple]] = []
    while todo or running:
        while todo and len(running) < jobs:
            task = todo.pop(0)
            command = worker_command(regime, *task, workdir, device, threads)
            running.append((subprocess.Popen(command, env=env), task))
        time.sleep(0.5)
        for process, task in list(running):
            if process.poll() is not None:
                running.remove((process, task))
                if process.returncode != 0:
                    raise SystemExit(f"{task[0]} seed {task[1]} failed (exit {process.returncode})")


def matched_epochs(regime: Regime, reference: list[dict]) -> int:
    """Full-data epochs with about as many sample visits as the reference arm trained."""
    return max(1, round(statistics.fmean(r["trained"] for r in reference) / regime.train_images))


def run_arms(regime: Regime, arms: list[str], workdir: str, device: str = "cpu", jobs: int = 1,
             threads: int = 1, short_epochs: int | None = None) -> dict[str, list[dict]]:
    """Every arm over every seed; the matched arms once the arm they match has run."""
    prepare_data(regime, workdir)     # once, before any worker process reads it
    seeds = range(regime.seeds)
    direct = [a for a in arms if "matched_to" not in ARMS[a]]
    # seed by seed, every arm: a machine whose load drifts weighs on every arm's wall time alike
    execute([(a, s, regime.epochs) for s in seeds for a in direct], regime, workdir, device,
            jobs, threads)
    results = {a: [cached(workdir, regime, a, s, regime.epochs) for s in seeds] for a in direct}
    for arm in (a for a in arms if "matched_to" in ARMS[a]):
        reference = ARMS[arm]["matched_to"]
        if short_epochs is None and reference not in results:
            raise SystemExit(f"arm {arm} needs arm {reference} (or --short-epochs)")
        epochs = short_epochs or matched_epochs(regime, results[reference])
        execute([(arm, s, epochs) for s in seeds], regime, workdir, device, jobs, threads)
        results[arm] = [cached(workdir, regime, arm, s, epochs) for s in seeds]
    return results


# -- command line -------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="the quick regime (< 5 min on 2 cores)")
    p.add_argument("--out", default=None, help="write the JSON here (it is printed too)")
    p.add_argument("--plot", default=None, help="write the curves as a PNG here")
    p.add_argument("--workdir", default="runs/bench-diffusion",
                   help="shards and cached per-(arm, seed) results; a rerun continues from it")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated: " + ", ".join(ARMS))
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (one process each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--short-epochs", type=int, default=None,
                   help="full_short's epochs (default: matched to infobatch's sample visits)")
    for field in ("train_images", "heldout_images", "image_size", "batch_size", "epochs",
                  "seeds", "lr", "warmup", "eval_timesteps", "eval_every", "draw_size",
                  "norm_buckets", "norm_smoothing"):
        kind = float if field in ("lr", "warmup", "norm_smoothing") else int
        p.add_argument(f"--{field.replace('_', '-')}", type=kind, default=None)
    p.add_argument("--channels", default=None, help="UNet widths, e.g. 16,32")
    p.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)
    p.add_argument("--regime-json", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def regime_from(args: argparse.Namespace) -> Regime:
    if args.regime_json:
        fields = json.loads(args.regime_json)
        return Regime(**dict(fields, channels=tuple(fields["channels"])))
    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(Regime)
               if getattr(args, f.name, None) is not None}
    if args.channels:
        changes["channels"] = tuple(int(c) for c in args.channels.split(","))
    return dataclasses.replace(REGIMES["quick" if args.quick else "full"], **changes)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    regime = regime_from(args)
    if args.worker:
        arm, seed, epochs = args.worker
        run_one(regime, arm, int(seed), int(epochs), args.workdir, torch.device(args.device))
        return None
    arms = args.arms.split(",")
    if "full" not in arms or not set(arms) <= set(ARMS):
        raise SystemExit(f"--arms must include full and be among {', '.join(ARMS)}")
    started = time.perf_counter()
    results = run_arms(regime, arms, args.workdir, args.device, args.jobs, args.threads,
                       args.short_epochs)
    result = summarize(dataclasses.asdict(regime), results)
    result["meta"] = {"command": " ".join(["python", "bench/diffusion.py", *(argv or sys.argv[1:])]),
                      "wall_s_this_invocation": time.perf_counter() - started,
                      "device": args.device, "jobs": args.jobs, "threads": args.threads,
                      "cpus": os.cpu_count(), "torch": torch.__version__,
                      "python": platform.python_version()}
    if args.out:
        write_json(args.out, result)
    if args.plot:
        plot(result, args.plot)
    json.dump({k: v for k, v in result.items() if k != "arms"}, sys.stdout, indent=1)
    print()
    return result


if __name__ == "__main__":
    main()

"""Does InfoBatch stay off the GPU's critical path? Five checks on a CUDA device, one JSON object.

    python bench/gpu_check.py              # on a CUDA machine; prints JSON
    python bench/gpu_check.py --cpu        # the same code on the CPU, gloo in place of NCCL:
                                           # tries the script, says nothing about GPUs

Without CUDA (and without ``--cpu``) it prints ``{"skipped": "no CUDA device", ...}`` and
exits 0. The training data are synthetic local shards (``--samples`` vectors of 64 floats);
everything runs in one process, which is rank 0 of a one-rank process group.

- ``distributed``: one rank under NCCL (``init_process_group("nccl", world_size=1)`` through a
  FileStore): an epoch of the three lines through ``ib.bound()`` and ``ib.end_epoch()``,
  committed.
- ``sync_free``: two epochs of the same loop (the second prunes) with
  ``torch.cuda.set_sync_debug_mode("error")`` around each of our calls: every ``next()`` of
  ``ib.bound``, ``ib.update`` and ``ib.end_epoch``. A call that makes the host wait for the
  GPU raises, and the result names the call.
- ``bf16``: a per-sample loss in bfloat16 under autocast, weights ``1/(1-0.3)`` (not exact
  in bfloat16): ``ib.update`` must return float32 equal to ``mean(loss.float() * weights)``;
  the result also shows how far a bfloat16 weighting would be, so the check can tell.
- ``throughput``: steps/s of the same loader and model without InfoBatch's training-side
  calls (a plain loop, ``per_sample.mean()``) and with them (``bound``, ``update``;
  ``prune_ratio=0``, so both train the same samples): the overhead of our calls alone.
  The arms alternate (persistent workers), each epoch timed from its first batch to its
  last step done on the device;
  the ratio is the median with over the median without (goal >= 0.99). ``end_epoch``'s
  seconds are reported apart, and the loader's own batches/s shows whether the GPU, not
  the loader, bounds the steps.
- ``ffhq_example``: a few optimizer steps of ``examples/ffhq_diffusion/train.py`` (its own
  process, accelerate) on procedural faces written here: in pixel space and in latent space
  on a randomly initialised AutoencoderKL (nothing downloads), each with bf16 autocast, EMA
  and gradient accumulation (``--mixed_precision no`` on the CPU), checking that each run
  reaches ``--max_train_steps`` and saves its pipeline; reports each run's steps/s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import webdataset as wds

import infobatch_stream as ibs

FEATURES, CLASSES = 64, 10
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FFHQ = os.path.join(ROOT, "examples", "ffhq_diffusion")
GOAL_RATIO = 0.99


class SyncCaught(RuntimeError):
    """A call of ours made the host wait for the GPU; names the call."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU under gloo (tries the script)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the test suite's smoke run)")
    p.add_argument("--samples", type=int, default=131072)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--width", type=int, default=8192, help="hidden width of the MLP")
    p.add_argument("--depth", type=int, default=8, help="hidden layers of the MLP")
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--rounds", type=int, default=5, help="timed epochs per arm")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.batch_size, args.width, args.depth = 512, 64, 64, 2
        args.workers, args.rounds = 1, 2
    return args


def write_shards(directory: str, samples: int, shards: int) -> list[str]:
    """Shards of (x.f32: 64 float32 as bytes, cls); the class is a fixed projection's argmax."""
    rng = np.random.default_rng(0)
    per_shard = -(-samples // shards)
    projection = rng.normal(size=(FEATURES, CLASSES))
    paths = []
    for start in range(0, samples, per_shard):
        path = os.path.join(directory, f"shard-{start // per_shard:06d}.tar")
        with wds.TarWriter(path) as sink:
            for index in range(start, min(start + per_shard, samples)):
                x = rng.normal(size=FEATURES).astype(np.float32)
                sink.write({"__key__": f"{index:08d}", "x.f32": x.tobytes(),
                            "cls": str(int(np.argmax(x @ projection)))})
        paths.append(path)
    return paths


def to_features(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, np.float32)


def build_loader(ib: ibs.InfoBatch, shards: list[str], args: argparse.Namespace) -> wds.WebLoader:
    dataset = (wds.WebDataset(shards, shardshuffle=False, empty_check=False)
               .compose(ib.stage())
               .to_tuple("x.f32", "cls", "__key_hash__", "__weight__")
               .map_tuple(to_features, int, None, None)
               .batched(args.batch_size, partial=False))
    return wds.WebLoader(dataset, batch_size=None, num_workers=args.workers,
                         pin_memory=torch.cuda.is_available() and not args.cpu,
                         persistent_workers=args.workers > 0)


def build_model(args: argparse.Namespace, device: torch.device):
    layers: list[torch.nn.Module] = [torch.nn.Linear(FEATURES, args.width), torch.nn.GELU()]
    for _ in range(args.depth - 1):
        layers += [torch.nn.Linear(args.width, args.width), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(args.width, CLASSES)).to(device)
    return model, torch.optim.SGD(model.parameters(), lr=1e-3)


class Guard:
    """``torch.cuda.set_sync_debug_mode("error")`` around a call of ours, when ``enabled``."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    @contextlib.contextmanager
    def __call__(self, call: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        except RuntimeError as exc:
            if "synchroniz" in str(exc):
                raise SyncCaught(f"{call}: {str(exc).splitlines()[0]}") from exc
            raise
        finally:
            torch.cuda.set_sync_debug_mode("default")


def to_device(batch, device: torch.device) -> list[torch.Tensor]:
    return [torch.as_tensor(t).to(device, non_blocking=True) for t in batch]


def step(model, optimizer, loss: torch.Tensor) -> None:
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def infobatch_epoch(ib: ibs.InfoBatch, loader, model, optimizer, device: torch.device,
                    guard: Guard) -> dict[str, float]:
    """One epoch of the three lines (bf16 autocast); our calls under ``guard``."""
    steps, clock = 0, Clock(device)
    batches = iter(ib.bound(loader))
    while True:
        with guard("next(ib.bound(loader))"):
            batch = next(batches, None)
        if batch is None:
            break
        clock.first_batch()
        x, y, keys, weights = to_device(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            per_sample = F.cross_entropy(model(x), y, reduction="none")
        with guard("ib.update"):
            loss = ib.update(per_sample, keys, weights)
        step(model, optimizer, loss)
        steps += 1
    seconds = clock.stop()
    with guard("ib.end_epoch"):
        ib.end_epoch()
    return {"steps": steps, "steps_per_s": steps / seconds, "end_epoch_s": clock.since_stop()}


def plain_epoch(loader, model, optimizer, device: torch.device) -> dict[str, float]:
    """The same epoch without InfoBatch's training-side calls."""
    steps, clock = 0, Clock(device)
    for batch in loader:
        clock.first_batch()
        x, y, _, _ = to_device(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            per_sample = F.cross_entropy(model(x), y, reduction="none")
        step(model, optimizer, per_sample.mean())
        steps += 1
    return {"steps": steps, "steps_per_s": steps / clock.stop()}


class Clock:
    """An epoch's training time: from its first batch in hand (the workers' start-up, the
    same in both arms, is left out) to its last step done on the device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.started: float | None = None
        self.stopped = 0.0

    def first_batch(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def stop(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.stopped = time.perf_counter()
        return self.stopped - (self.started if self.started is not None else self.stopped)

    def since_stop(self) -> float:
        return time.perf_counter() - self.stopped


def check_distributed(context: dict[str, Any]) -> dict[str, Any]:
    ib = context["infobatch"]("distributed", num_epochs=1)
    model, optimizer = build_model(context["args"], context["device"])
    loader = build_loader(ib, context["shards"], context["args"])
    epoch = infobatch_epoch(ib, loader, model, optimizer, context["device"], Guard(False))
    return {"ok": ib.store.latest_epoch == 0 and epoch["steps"] > 0,
            "backend": dist.get_backend(), "steps": epoch["steps"]}


def check_sync_free(context: dict[str, Any]) -> dict[str, Any]:
    if context["device"].type != "cuda":
        return {"ok": None, "skipped": "torch.cuda.set_sync_debug_mode needs a CUDA device"}
    ib = context["infobatch"]("sync", num_epochs=4, prune_ratio=0.5)
    model, optimizer = build_model(context["args"], context["device"])
    loader = build_loader(ib, context["shards"], context["args"])
    steps = []
    try:
        for _ in range(2):  # epoch 1 prunes from epoch 0's scores
            steps.append(infobatch_epoch(ib, loader, model, optimizer, context["device"],
                                         Guard(True))["steps"])
    except SyncCaught as caught:
        return {"ok": False, "synchronized": str(caught), "epochs_done": len(steps)}
    return {"ok": True, "steps": steps}


def check_bf16(context: dict[str, Any]) -> dict[str, Any]:
    device = context["device"]
    ib = context["infobatch"]("bf16", num_epochs=1, prune_ratio=0.3)
    generator = torch.Generator(device="cpu").manual_seed(0)
    loss = torch.rand(4096, generator=generator).to(device=device, dtype=torch.bfloat16)
    weights = torch.full((4096,), 1 / (1 - 0.3), dtype=torch.float32, device=device)
    keys = torch.from_numpy(ibs.hash_keys([f"sample-{i:05d}" for i in range(4096)])).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        returned = ib.update(loss, keys, weights)
    ib.end_epoch()
    expected = (loss.float() * weights).mean()
    in_bf16 = (loss * weights.to(torch.bfloat16)).float().mean()
    error = float((returned.float() - expected).abs() / expected)
    bf16_error = float((in_bf16 - expected).abs() / expected)
    return {"ok": returned.dtype == torch.float32 and error <= 1e-6 < bf16_error,
            "dtype": str(returned.dtype).removeprefix("torch."), "relative_error": error,
            "relative_error_if_weighted_in_bf16": bf16_error}


def check_throughput(context: dict[str, Any]) -> dict[str, Any]:
    args, device = context["args"], context["device"]
    ib = context["infobatch"]("throughput", num_epochs=args.rounds + 1, prune_ratio=0.0)
    model, optimizer = build_model(args, device)
    loader = build_loader(ib, context["shards"], args)
    started = time.perf_counter()
    loader_batches = sum(1 for _ in loader)
    loader_rate = loader_batches / (time.perf_counter() - started)
    plain_epoch(loader, model, optimizer, device)  # warm-up: workers, kernels, allocator
    infobatch_epoch(ib, loader, model, optimizer, device, Guard(False))
    plain, with_ib = [], []
    for round_ in range(args.rounds):
        arms = [lambda: plain.append(plain_epoch(loader, model, optimizer, device)),
                lambda: with_ib.append(infobatch_epoch(ib, loader, model, optimizer, device,
                                                       Guard(False)))]
        for arm in arms if round_ % 2 == 0 else arms[::-1]:  # ABBA: drift hits both arms alike
            arm()
    without = statistics.median(e["steps_per_s"] for e in plain)
    within = statistics.median(e["steps_per_s"] for e in with_ib)
    return {"ok": within / without >= GOAL_RATIO, "goal": GOAL_RATIO, "ratio": within / without,
            "steps_per_s_without": without, "steps_per_s_with": within,
            "steps_per_epoch": with_ib[0]["steps"],
            "end_epoch_s_median": statistics.median(e["end_epoch_s"] for e in with_ib),
            "loader_batches_per_s": loader_rate, "rounds": args.rounds}


def example_data(workdir: str, args: argparse.Namespace) -> tuple[str, str, int]:
    """Procedural faces as shards (a multiple of the workers) and a tiny random VAE, on disk."""
    sys.path.insert(0, FFHQ)
    import faces
    import make_shards
    from diffusers import AutoencoderKL

    images, shards = (32, 2) if args.quick else (512, 2 * max(1, args.workers))
    resolution = 8 if args.quick else 64
    faces.write_faces(os.path.join(workdir, "faces"), images, size=resolution, progress=False)
    pattern, _ = make_shards.write_shards(os.path.join(workdir, "faces"),
                                          os.path.join(workdir, "faces-shards"),
                                          shard_size=images // shards, resize=resolution,
                                          progress=False)
    vae = os.path.join(workdir, "vae")
    AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                  norm_num_groups=8, sample_size=resolution).save_pretrained(vae)
    return pattern, vae, images


def check_ffhq_example(context: dict[str, Any]) -> dict[str, Any]:
    args, device = context["args"], context["device"]
    workdir = context["workdir"]
    pattern, vae, images = example_data(workdir, args)
    steps = 6 if args.quick else 40   # past the first epoch's commit: the second prunes
    common = ["--shards", pattern, "--dataset_size", str(images), "--num_epochs", "10",
              "--max_train_steps", str(steps), "--gradient_accumulation_steps", "2",
              "--use_ema", "--random_flip", "--logger", "none", "--num_inference_steps", "2",
              "--eval_batch_size", "4", "--checkpointing_steps", str(10**9)]
    if args.quick:
        common += ["--resolution", "8", "--block_out_channels", "8,16", "--train_batch_size", "4",
                   "--dataloader_num_workers", "0", "--threads", "1"]
    else:
        common += ["--resolution", "64", "--model", "small", "--train_batch_size", "32",
                   "--dataloader_num_workers", str(args.workers)]
    common += ["--cpu", "--mixed_precision", "no"] if device.type == "cpu" else \
        ["--mixed_precision", "bf16"]
    results = {name: run_example(common + extra, os.path.join(workdir, f"ffhq-{name}"), steps)
               for name, extra in (("pixels", []), ("latents", ["--vae", vae]))}
    return {"ok": all(r["ok"] for r in results.values()), **results}


def run_example(argv: list[str], out: str, steps: int) -> dict[str, Any]:
    """train.py in a process of its own (accelerate owns its process group there)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, os.path.join(FFHQ, "train.py"), *argv,
                           "--output_dir", out], env=env, capture_output=True, text=True,
                          timeout=600)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        return {"ok": False, "returncode": done.returncode, "stderr": done.stderr[-2000:]}
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    saved = os.path.exists(os.path.join(out, "model_index.json"))
    epochs = len(summary["history"])   # epochs committed before the cap
    return {"ok": summary["global_step"] == steps and saved and epochs >= 1,
            "global_step": summary["global_step"], "epochs_committed": epochs,
            "pruned_in_epoch_1": summary["history"][1]["pruned"] if epochs > 1 else None,
            "pipeline_saved": saved, "seconds_with_startup": seconds,
            "steps_per_s_with_startup": steps / seconds}


def run_check(fn: Callable[[dict[str, Any]], dict[str, Any]], context: dict[str, Any]) -> dict:
    """A check's result, or its error: one check failing never hides the others."""
    try:
        return fn(context)
    except Exception as exc:
        return {"ok": False, "error": "".join(traceback.format_exception_only(exc)).strip()[-2000:]}


def open_process_group(backend: str, workdir: str) -> None:
    if backend == "nccl":
        torch.cuda.set_device(0)
    store = dist.FileStore(os.path.join(workdir, "process-group"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)


def environment(device: torch.device) -> dict[str, Any]:
    return {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device", "torch": torch.__version__,
                          "cuda_build": torch.version.cuda}))
        return 0
    device = torch.device("cpu" if args.cpu else "cuda")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
        os.environ.setdefault("INFOBATCH_STREAM_CACHE", os.path.join(workdir, "cache"))
        open_process_group("gloo" if args.cpu else "nccl", workdir)
        context = {"args": args, "device": device, "workdir": workdir,
                   "shards": write_shards(workdir, args.samples, 2 * max(1, args.workers)),
                   "infobatch": lambda name, **kw: ibs.InfoBatch(
                       os.path.join(workdir, name), run_id=f"gpu-check-{name}", **kw)}
        checks = {name: run_check(fn, context) for name, fn in [
            ("distributed", check_distributed), ("sync_free", check_sync_free), ("bf16", check_bf16),
            ("throughput", check_throughput), ("ffhq_example", check_ffhq_example)]}
        dist.destroy_process_group()
    result = {**environment(device), "dry_run_on_cpu": args.cpu, "checks": checks,
              "all_ok": all(c.get("ok") is not False for c in checks.values()),
              "config": {k: getattr(args, k) for k in ("samples", "batch_size", "width", "depth",
                                                       "workers", "rounds")}}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

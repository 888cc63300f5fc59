"""The whole FFHQ-diffusion demo in one command, on faces that need no download.

    python examples/ffhq_diffusion/run_demo.py

1. draws procedural faces (``faces.py``) into FFHQ's folder layout: training ids and
   held-out ids (never in the training shards);
2. ``make_shards.py``: the folder -> webdataset shards (local, resized);
3. ``train.py`` with InfoBatch and with ``--no_prune`` (the baseline: same code, r=0), each
   with several seeds (``--modes baseline,infobatch,random`` adds random pruning at
   InfoBatch's budget), run as subprocesses, ``--jobs`` at a time; the command lines are
   printed so each run can be repeated by hand, and each run's epochs are reported on the
   console as they finish;
4. a report: samples pruned by the stage and samples saved over the run, held-out denoising
   loss of each mode (mean and seed-to-seed sd), training time; also written to
   ``WORKDIR/report.md``, with ``WORKDIR/samples.png`` (held-out real faces beside each
   mode's generated ones, seed 0, at the training resolution, 96 px per face on screen).

Every run writes its last checkpoint, its pipeline (``save_pretrained``), ``samples.png``,
``curves.png`` and ``summary.json`` under ``WORKDIR/runs/<mode>-seed<k>/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import faces  # noqa: E402 - found through HERE, put on sys.path just above
import make_shards  # noqa: E402

# The demo's setting, tuned to finish within 5 minutes on 2 CPU cores (see docs/demo.md).
DEMO = {
    "train_images": 768, "heldout_images": 64, "draw_size": 64, "image_size": 16,
    "epochs": 16, "batch_size": 16, "lr": 3e-3, "channels": "16,32,64",
    "eval_timesteps": 8, "seeds": 3,
}
MODES = {"baseline": ["--no_prune"], "infobatch": [], "random": ["--policy", "random"]}
SAMPLE_IMAGES = 36
FACE_PIXELS = 96  # on screen, per face: train.py upscales its samples to this, and so do we
# train.py's per-epoch line, for the console's compact progress
EPOCH_LINE = re.compile(r"epoch\s+(?P<epoch>\d+)/(?P<epochs>\d+)\s+trained\s+(?P<trained>\d+)\s+"
                        r"pruned\s+\d+\s+\(\s*(?P<pruned>[\d.]+)%\).*?held-out (?P<heldout>\S+)"
                        r".*?(?P<seconds>[\d.]+)s \(")


def train_command(args, shards: str, heldout: str, out: str, seed: int, mode: str,
                  threads: int) -> list[str]:
    # Half an epoch of warmup; AdamW's usual betas, no weight decay; a checkpoint at each
    # epoch's end only (the last one kept); samples once, at the end.
    warmup = args.train_images // args.batch_size // 2
    return [
        sys.executable, os.path.join(HERE, "train.py"), "--shards", shards,
        "--dataset_size", str(args.train_images), "--heldout", heldout, "--output_dir", out,
        "--resolution", str(args.image_size), "--num_epochs", str(args.epochs),
        "--train_batch_size", str(args.batch_size), "--learning_rate", str(args.lr),
        "--lr_warmup_steps", str(warmup), "--adam_beta1", "0.9", "--adam_weight_decay", "0",
        "--model", "tiny", "--block_out_channels", args.channels, "--random_flip",
        "--eval_images", str(args.heldout_images), "--eval_timesteps", str(args.eval_timesteps),
        "--seed", str(seed), "--dataloader_num_workers", "0", "--threads", str(threads),
        "--eval_batch_size", str(SAMPLE_IMAGES), "--save_images_epochs", str(args.epochs),
        "--checkpointing_steps", str(10**9), "--checkpoints_total_limit", "1",
        "--logger", "none", *MODES[mode],
    ]


def progress(name: str, path: str, offset: int) -> int:
    """Print the epochs a run's log gained since ``offset``, one compact line each; returns the
    new offset (only whole lines are consumed)."""
    with open(path) as f:
        f.seek(offset)
        text = f.read()
    done = text.rfind("\n") + 1
    for line in text[:done].splitlines():
        match = EPOCH_LINE.search(line)
        if match:
            m = match.groupdict()
            print(f"  {name:<16} epoch {int(m['epoch']):2d}/{m['epochs']}  trained {m['trained']:>5}"
                  f"  pruned {float(m['pruned']):4.1f}%  held-out {m['heldout']}"
                  f"  {float(m['seconds']):4.1f}s", flush=True)
    return offset + len(text[:done].encode())


def run_all(commands: list[tuple[str, list[str]]], jobs: int, logs: str) -> dict[str, float]:
    """Run the commands, ``jobs`` at a time, printing each run's epochs as they finish;
    returns each one's wall time. Raises on failure."""
    pending = list(commands)
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    offsets: dict[str, int] = {}
    walls: dict[str, float] = {}
    while pending or running:
        while pending and len(running) < jobs:
            name, command = pending.pop(0)
            # open while its process runs, closed when it ends
            log = open(os.path.join(logs, f"{name}.log"), "w")  # noqa: SIM115
            print(f"  start {name}: {shlex.join(command)}", flush=True)
            running[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT),
                             time.perf_counter(), log)
            offsets[name] = 0
        time.sleep(0.2)
        for name, (process, started, log) in list(running.items()):
            finished = process.poll() is not None
            offsets[name] = progress(name, os.path.join(logs, f"{name}.log"), offsets[name])
            if not finished:
                continue
            log.close()
            del running[name]
            walls[name] = time.perf_counter() - started
            if process.returncode != 0:
                for other, _, other_log in running.values():
                    other.kill()
                    other_log.close()
                with open(os.path.join(logs, f"{name}.log")) as f:
                    tail = f.read()[-3000:]
                raise SystemExit(f"{name} failed (exit {process.returncode}):\n{tail}")
            print(f"  done  {name} in {walls[name]:.0f}s", flush=True)
    return walls


def mode_stats(runs: list[dict]) -> dict:
    """A mode's means over its seeds: loss (and sd), samples trained, pruning, time."""
    losses = [s["final_heldout_loss"] for s in runs]
    pruning = [h for s in runs for h in s["history"] if h["pruned"] > 0]
    return {
        "loss": statistics.mean(losses), "n": len(runs),
        "sd": statistics.stdev(losses) if len(losses) > 1 else float("nan"),
        "trained": statistics.mean(s["trained"] for s in runs),
        "let_through": statistics.mean(s["dataset_size"] * s["epochs"] - s["pruned"] for s in runs),
        "stage": statistics.mean(s["saving"] for s in runs),
        "pruning_epochs": sorted({h["epoch"] for h in pruning}),
        "per_pruning_epoch": (sum(h["pruned"] for h in pruning)
                              / sum(h["dataset_size"] for h in pruning)) if pruning else 0.0,
        "wall": statistics.mean(s["train_seconds"] for s in runs),
        "cpu": statistics.mean(s["train_cpu_seconds"] for s in runs),
    }


def epochs_text(epochs: list[int]) -> str:
    if not epochs:
        return "no epoch"
    return f"epochs {epochs[0]}-{epochs[-1]}" if len(epochs) > 1 else f"epoch {epochs[0]}"


def mode_line(mode: str, m: dict, base: dict, epochs: int) -> str:
    """One mode against the baseline: what the stage pruned, what the run saved, the loss."""
    diff = m["loss"] - base["loss"]
    within = abs(diff) <= 2 * base["sd"]
    saved = 1 - m["trained"] / base["trained"]
    other = (m["let_through"] - m["trained"]) / base["trained"]
    return (
        f"- {mode}: samples saved **{100 * saved:.1f}%** over the run ({m['trained']:.0f} "
        f"trained against {base['trained']:.0f}). The stage pruned "
        f"{100 * m['per_pruning_epoch']:.1f}% of the samples of each pruning epoch "
        f"({epochs_text(m['pruning_epochs'])} of 0-{epochs - 1}), {100 * m['stage']:.1f}% of all "
        f"epochs' samples; the other {100 * other:.1f} points are incomplete last batches, "
        f"which every run drops (batched(partial=False)). Held-out loss **{m['loss']:.4f}** "
        f"(sd {m['sd']:.4f}), {diff:+.4f} = {diff / base['loss']:+.1%} = "
        f"{diff / base['sd']:+.1f} baseline sd: "
        + ("**within the seed-to-seed noise** (|difference| <= 2 sd)" if within else
           "**not within the seed-to-seed noise** (|difference| > 2 sd)")
        + f"; {m['wall']:.0f}s wall / {m['cpu']:.0f}s CPU of training per run "
        f"({1 - m['cpu'] / base['cpu']:.0%} less CPU: the compute saved)")


def report(summaries: dict[str, dict], walls: dict[str, float], args, total: float) -> str:
    """The report as Markdown: one row per run, then the comparison with the baseline."""
    lines = [("| run | seed | samples trained | pruned by the stage (all epochs) | steps "
              "| held-out loss | training wall / CPU | process wall |"),
             "|---|---|---|---|---|---|---|---|"]
    for name, s in sorted(summaries.items(), key=lambda kv: (kv[1]["mode"], kv[1]["seed"])):
        lines.append(f"| {s['mode']} | {s['seed']} | {s['trained']} | {100 * s['saving']:.1f}% "
                     f"| {s['steps']} | {s['final_heldout_loss']:.4f} "
                     f"| {s['train_seconds']:.0f}s / {s['train_cpu_seconds']:.0f}s "
                     f"| {walls[name]:.0f}s |")
    by_mode: dict[str, list[dict]] = {}
    for s in summaries.values():
        by_mode.setdefault(s["mode"], []).append(s)
    base = mode_stats(by_mode["baseline"])
    lines += ["", ("**Pruned by the stage**: the samples the pruning stage dropped, as a share "
                   "of an epoch's samples; epoch 0 (no scores yet) and the annealing epochs "
                   "prune nothing, so the share over all epochs is lower than over the pruning "
                   "epochs. **Saved**: the samples not trained over the whole run, against the "
                   "baseline's count; that is what saves compute (the training CPU time falls "
                   "with it)."), "",
              (f"Held-out denoising loss: noise-prediction MSE on {args.heldout_images} "
               f"held-out faces (ids not in the training shards) x {args.eval_timesteps} "
               f"fixed timesteps, fixed noise; the same problems for every run. "
               f"Seed-to-seed noise: the sd of the baseline's loss over its {base['n']} "
               f"seeds (a seed sets the model's init, the timesteps, noise, flips and "
               f"shuffles)."), "",
              (f"- baseline: held-out loss **{base['loss']:.4f}** (sd {base['sd']:.4f}), "
               f"{base['trained']:.0f} samples, {base['wall']:.0f}s wall / {base['cpu']:.0f}s "
               f"CPU of training per run")]
    for mode in (m for m in MODES if m != "baseline" and m in by_mode):
        lines.append(mode_line(mode, mode_stats(by_mode[mode]), base, args.epochs))
    lines.append(f"- whole demo: {total:.0f}s wall ({args.jobs} runs at a time, "
                 f"{os.cpu_count()} CPUs)")
    return "\n".join(lines)


def comparison_png(summaries: dict[str, dict], path: str) -> None:
    """Held-out loss of every run per epoch, and against the samples it has trained so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"baseline": "tab:blue", "infobatch": "tab:orange", "random": "tab:green"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for s in summaries.values():
        history = s["history"]
        loss = [h["heldout_loss"] for h in history]
        seen = [sum(h["trained"] for h in history[:i + 1]) for i in range(len(history))]
        label = s["mode"] if s["seed"] == 0 else None
        left.plot([h["epoch"] for h in history], loss, color=colors[s["mode"]], alpha=0.8, label=label)
        right.plot(seen, loss, color=colors[s["mode"]], alpha=0.8, label=label)
    left.set_xlabel("epoch")
    right.set_xlabel("samples trained")
    left.set_ylabel("held-out denoising loss")
    left.set_yscale("log")
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def face_grid(images: list, scale: int):
    """Faces side by side in a square grid, each upscaled ``scale`` times (nearest: the pixels
    the model sees), as train.py lays out its samples."""
    from PIL import Image

    size = images[0].size[0]
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * size, rows * size), "white")
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % cols) * size, (i // cols) * size))
    return grid.resize((cols * size * scale, rows * size * scale), Image.NEAREST)


def samples_png(args, data: str, runs: str, modes: list[str], path: str) -> None:
    """Held-out real faces at the training resolution beside each mode's samples (seed 0)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    heldout = make_shards.list_images(data, ids=(args.train_images,
                                                 args.train_images + args.heldout_images))
    real = [Image.open(io.BytesIO(make_shards.encode(file, args.image_size)[1]))
            for _, file in heldout[:SAMPLE_IMAGES]]
    panels = [(f"held-out faces at {args.image_size}x{args.image_size} (never trained)",
               face_grid(real, max(1, FACE_PIXELS // args.image_size)))]
    for mode in modes:
        panels.append((f"{mode}, seed 0: generated", Image.open(
            os.path.join(runs, f"{mode}-seed0", "samples.png")).convert("RGB")))
    width = sum(p.size[0] for _, p in panels) + 40 * len(panels)
    height = max(p.size[1] for _, p in panels) + 60
    fig, axes = plt.subplots(1, len(panels), figsize=(width / 100, height / 100), dpi=100)
    for ax, (title, picture) in zip(axes, panels, strict=True):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(title, fontsize=11)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--workdir", default="runs/ffhq_demo", help="everything goes here (wiped)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="training runs at a time (default: one per CPU, at most 2)")
    parser.add_argument("--modes", default="baseline,infobatch",
                        help="comma-separated, from: " + ", ".join(MODES))
    for name, value in DEMO.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if "baseline" not in modes or not set(modes) <= set(MODES):
        parser.error(f"--modes must include baseline and be among {', '.join(MODES)}")
    cpus = os.cpu_count() or 1
    args.jobs = args.jobs or max(1, min(2, cpus))
    threads = max(1, cpus // args.jobs)
    started = time.perf_counter()

    shutil.rmtree(args.workdir, ignore_errors=True)
    data, runs = os.path.join(args.workdir, "faces"), os.path.join(args.workdir, "runs")
    os.makedirs(runs)
    total_images = args.train_images + args.heldout_images
    print(f"[1/4] drawing {total_images} faces into {data} (FFHQ layout)", flush=True)
    faces.write_faces(data, total_images, size=args.draw_size, progress=False)
    print("[2/4] writing shards", flush=True)
    shards_dir = os.path.join(args.workdir, "shards")
    shards, _ = make_shards.write_shards(data, shards_dir, "train", shard_size=256,
                                         resize=args.image_size, ids=(0, args.train_images),
                                         progress=False)
    heldout, _ = make_shards.write_shards(data, shards_dir, "heldout", shard_size=1000,
                                          resize=args.image_size,
                                          ids=(args.train_images, total_images), progress=False)

    print(f"[3/4] training: {', '.join(modes)} x {args.seeds} seeds, {args.jobs} at a time",
          flush=True)
    commands = []
    for seed in range(args.seeds):
        for mode in modes:
            name = f"{mode}-seed{seed}"
            commands.append((name, train_command(args, shards, heldout, os.path.join(runs, name),
                                                 seed, mode, threads)))
    walls = run_all(commands, args.jobs, runs)
    summaries = {}
    for name, _ in commands:
        with open(os.path.join(runs, name, "summary.json")) as f:
            summaries[name] = json.load(f)

    print("[4/4] report", flush=True)
    text = report(summaries, walls, args, time.perf_counter() - started)
    with open(os.path.join(args.workdir, "report.md"), "w") as f:
        f.write(text + "\n")
    comparison_png(summaries, os.path.join(args.workdir, "comparison.png"))
    samples_png(args, data, runs, modes, os.path.join(args.workdir, "samples.png"))
    print(text)
    print(f"\nper run: {runs}/<run>/samples.png, curves.png, summary.json; all runs: "
          f"{os.path.join(args.workdir, 'comparison.png')}, "
          f"{os.path.join(args.workdir, 'samples.png')} (real and generated faces side by "
          f"side), {os.path.join(args.workdir, 'report.md')}")


if __name__ == "__main__":
    main()

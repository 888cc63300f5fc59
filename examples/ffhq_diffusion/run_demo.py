"""The whole FFHQ-diffusion demo in one command, on faces that need no download.

    python examples/ffhq_diffusion/run_demo.py

1. draws procedural faces (``faces.py``) into FFHQ's folder layout: training ids and
   held-out ids (never in the training shards);
2. ``make_shards.py``: the folder -> webdataset shards (local, resized);
3. ``train.py`` with InfoBatch and with ``--no_prune`` (the baseline: same code, r=0), each
   with several seeds (``--modes baseline,infobatch,random`` adds random pruning at
   InfoBatch's budget), run as subprocesses, ``--jobs`` at a time; the command lines are
   printed so each run can be repeated by hand;
4. a report: share of samples saved, held-out denoising loss of each mode (mean and
   seed-to-seed sd), training time; also written to ``WORKDIR/report.md``.

Every run writes its last checkpoint, its pipeline (``save_pretrained``), ``samples.png``,
``curves.png`` and ``summary.json`` under ``WORKDIR/runs/<mode>-seed<k>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import faces
import make_shards

# The demo's setting, tuned to finish within 5 minutes on 2 CPU cores (see docs/demo.md).
DEMO = {
    "train_images": 768, "heldout_images": 64, "draw_size": 64, "image_size": 16,
    "epochs": 16, "batch_size": 16, "lr": 3e-3, "channels": "16,32,64",
    "eval_timesteps": 8, "seeds": 3,
}
MODES = {"baseline": ["--no_prune"], "infobatch": [], "random": ["--policy", "random"]}


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
        "--eval_batch_size", "36", "--save_images_epochs", str(args.epochs),
        "--checkpointing_steps", str(10**9), "--checkpoints_total_limit", "1",
        "--logger", "none", *MODES[mode],
    ]


def run_all(commands: list[tuple[str, list[str]]], jobs: int, logs: str) -> dict[str, float]:
    """Run the commands, ``jobs`` at a time; returns each one's wall time. Raises on failure."""
    pending = list(commands)
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    walls: dict[str, float] = {}
    while pending or running:
        while pending and len(running) < jobs:
            name, command = pending.pop(0)
            log = open(os.path.join(logs, f"{name}.log"), "w")
            print(f"  start {name}: {shlex.join(command)}", flush=True)
            running[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT),
                             time.perf_counter(), log)
        time.sleep(0.2)
        for name, (process, started, log) in list(running.items()):
            if process.poll() is None:
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


def report(summaries: dict[str, dict], walls: dict[str, float], args, total: float) -> str:
    """The report as Markdown: one row per run, then the comparison with the baseline."""
    lines = [("| run | seed | samples trained | pruned by the stage | steps | held-out loss "
              "| training wall / CPU | process wall |"), "|---|---|---|---|---|---|---|---|"]
    for name, s in sorted(summaries.items(), key=lambda kv: (kv[1]["mode"], kv[1]["seed"])):
        lines.append(f"| {s['mode']} | {s['seed']} | {s['trained']} | {100 * s['saving']:.1f}% "
                     f"| {s['steps']} | {s['final_heldout_loss']:.4f} "
                     f"| {s['train_seconds']:.0f}s / {s['train_cpu_seconds']:.0f}s "
                     f"| {walls[name]:.0f}s |")

    by_mode: dict[str, list[dict]] = {}
    for s in summaries.values():
        by_mode.setdefault(s["mode"], []).append(s)

    def stats(mode):
        runs = by_mode[mode]
        losses = [s["final_heldout_loss"] for s in runs]
        sd = statistics.stdev(losses) if len(losses) > 1 else float("nan")
        return {"loss": statistics.mean(losses), "sd": sd, "n": len(runs),
                "trained": sum(s["trained"] for s in runs) / len(runs),
                "stage": statistics.mean(s["saving"] for s in runs),
                "wall": statistics.mean(s["train_seconds"] for s in runs),
                "cpu": statistics.mean(s["train_cpu_seconds"] for s in runs)}

    base = stats("baseline")
    lines += ["", (f"Held-out denoising loss: noise-prediction MSE on {args.heldout_images} "
                   f"held-out faces (ids not in the training shards) x {args.eval_timesteps} "
                   f"fixed timesteps, fixed noise; the same problems for every run. "
                   f"Seed-to-seed noise: the sd of the baseline's loss over its {base['n']} "
                   f"seeds (a seed sets the model's init, the timesteps, noise, flips and "
                   f"shuffles)."), "",
              (f"- baseline: held-out loss **{base['loss']:.4f}** (sd {base['sd']:.4f}), "
               f"{base['trained']:.0f} samples, {base['wall']:.0f}s wall / {base['cpu']:.0f}s "
               f"CPU of training per run")]
    for mode in (m for m in MODES if m != "baseline" and m in by_mode):
        m = stats(mode)
        diff = m["loss"] - base["loss"]
        within = abs(diff) <= 2 * base["sd"]
        lines.append(
            f"- {mode}: samples saved **{100 * (1 - m['trained'] / base['trained']):.1f}%** "
            f"(the stage pruned {100 * m['stage']:.1f}% of all epochs' samples; epoch 0 and "
            f"the annealing epochs train on everything); held-out loss **{m['loss']:.4f}** "
            f"(sd {m['sd']:.4f}), {diff:+.4f} = {diff / base['loss']:+.1%} = "
            f"{diff / base['sd']:+.1f} baseline sd: "
            + ("**within the seed-to-seed noise** (|difference| <= 2 sd)" if within else
               "**not within the seed-to-seed noise** (|difference| > 2 sd)")
            + f"; {m['wall']:.0f}s wall / {m['cpu']:.0f}s CPU of training per run "
            f"({1 - m['cpu'] / base['cpu']:.0%} less CPU)")
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
    print(text)
    print(f"\nper run: {runs}/<run>/samples.png, curves.png, summary.json; all runs: "
          f"{os.path.join(args.workdir, 'comparison.png')}, {os.path.join(args.workdir, 'report.md')}")


if __name__ == "__main__":
    main()

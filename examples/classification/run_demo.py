"""Digits classification with InfoBatch, random pruning at the same budget, and no pruning.

    python examples/classification/run_demo.py

Writes scikit-learn's digits as shards (``make_shards.py``), trains the small CNN of
``train.py`` in each mode with several seeds (in this process, one after the other) and
prints test accuracy (mean and seed-to-seed sd), samples trained and time per mode.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import make_shards  # noqa: E402 - found through HERE, put on sys.path just above
import train  # noqa: E402

MODES = {"baseline": ["--no-prune"], "infobatch": [], "random": ["--policy", "random"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/digits_demo", help="everything goes here (wiped)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    shutil.rmtree(args.workdir, ignore_errors=True)
    shards, test, n_train, n_test = make_shards.write_digits(os.path.join(args.workdir, "shards"))
    print(f"{n_train} training and {n_test} test digits; {args.epochs} epochs, "
          f"{args.seeds} seeds per mode", flush=True)

    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for seed in range(args.seeds):
        for mode, flags in MODES.items():
            out = os.path.join(args.workdir, "runs", f"{mode}-seed{seed}")
            results[mode].append(train.main([
                "--shards", shards, "--test", test, "--dataset-size", str(n_train),
                "--out", out, "--epochs", str(args.epochs), "--seed", str(seed),
                "--threads", str(args.threads), "--quiet", *flags]))

    base_trained = statistics.mean(s["trained"] for s in results["baseline"])
    lines = ["| mode | test accuracy (mean ± sd) | samples trained | saved vs baseline | time per run |",
             "|---|---|---|---|---|"]
    for mode, runs in results.items():
        accuracy = [s["test_accuracy"] for s in runs]
        sd = statistics.stdev(accuracy) if len(accuracy) > 1 else float("nan")
        trained = statistics.mean(s["trained"] for s in runs)
        lines.append(f"| {mode} | {100 * statistics.mean(accuracy):.2f}% ± {100 * sd:.2f} "
                     f"| {trained:.0f} | {100 * (1 - trained / base_trained):.1f}% "
                     f"| {statistics.mean(s['seconds'] for s in runs):.1f}s |")
    lines.append(f"\n{args.seeds} seeds per mode; whole demo {time.perf_counter() - started:.0f}s")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.workdir, "report.md"), "w") as f:
        f.write(text + "\n")
    return results


if __name__ == "__main__":
    main()

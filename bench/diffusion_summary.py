"""What bench/diffusion.py's runs say: per-arm summaries, the plateau criterion, the verdict,
and the curves as a PNG. Plain functions of the per-(arm, seed) result dicts and the regime's
settings (a dict), so a saved JSON can be judged and plotted again.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import infobatch_stream as ibs


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def in_sd(value: float, sd: float) -> float | None:
    """``value`` in units of ``sd``; None when one seed leaves no sd to measure in."""
    return value / sd if sd > 0 else None


def curves(runs: list[dict]) -> dict[str, list]:
    """Per-epoch held-out loss (None where not evaluated) and cumulative samples trained, per
    seed and their mean over seeds."""
    held = [[h["heldout_loss"] for h in r["history"]] for r in runs]
    seen = [[sum(h["trained"] for h in r["history"][:i + 1]) for i in range(len(r["history"]))]
            for r in runs]
    return {"heldout": held, "samples": seen,
            "heldout_mean": [None if None in v else statistics.fmean(v) for v in zip(*held, strict=True)],
            "samples_mean": [statistics.fmean(v) for v in zip(*seen, strict=True)],
            "pruned_mean": [statistics.fmean(h["pruned"] for h in e)
                            for e in zip(*(r["history"] for r in runs), strict=True)],
            "score_persistence_mean": [mean_of(h["score_persistence"] for h in e)
                                       for e in zip(*(r["history"] for r in runs), strict=True)]}


def mean_of(values: Any) -> float | None:
    """The mean of the values that are not None (None if there are none)."""
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def summarize_arm(runs: list[dict], full: dict[str, float]) -> dict[str, Any]:
    """One arm: per-seed values, mean and sd, and how it compares with the full-data arm."""
    final = [r["final_heldout_loss"] for r in runs]
    mean, sd = mean_sd(final)
    trained = statistics.fmean(r["trained"] for r in runs)
    wall = statistics.fmean(r["train_seconds"] for r in runs)
    cpu = statistics.fmean(r["train_cpu_seconds"] for r in runs)
    diff = mean - full["mean"]
    c = curves(runs)
    pruning = range(1, max(1, ibs.annealing_start(runs[0]["epochs"], full["delta"])))
    # the difference's standard error, for a reader who wants more than the baseline's sd
    se = math.sqrt(sd ** 2 / len(final) + full["sd"] ** 2 / full["n"])
    return {
        "seeds": [r["seed"] for r in runs], "epochs": runs[0]["epochs"],
        "final_heldout": final, "mean": mean, "sd": sd,
        "diff_vs_full": diff, "diff_vs_full_rel": diff / full["mean"],
        "diff_in_full_sd": in_sd(diff, full["sd"]),
        "diff_se": se, "within_2_full_sd": abs(diff) <= 2 * full["sd"],
        "samples_trained": [r["trained"] for r in runs], "samples_saved": 1 - trained / full["trained"],
        "steps": [r["steps"] for r in runs],
        "wall_s": [r["train_seconds"] for r in runs], "wall_saved": 1 - wall / full["wall"],
        "cpu_s": [r["train_cpu_seconds"] for r in runs], "cpu_saved": 1 - cpu / full["cpu"],
        "score_persistence": mean_of(c["score_persistence_mean"][e] for e in pruning),
        "curves": c,
    }


def plateau(delta: float, full_runs: list[dict]) -> dict[str, Any]:
    """Is the full-data arm on a plateau? Its held-out loss over the last (1 - delta) of the
    epochs (from the end of epoch floor(delta E) - 1 to the end) must improve by less than the
    sd of its final loss over seeds."""
    epochs = full_runs[0]["epochs"]
    start = max(1, ibs.annealing_start(epochs, delta))
    held = [[h["heldout_loss"] for h in r["history"]] for r in full_runs]
    gains = [h[start - 1] - h[-1] for h in held]
    _, sd = mean_sd([h[-1] for h in held])
    mean_curve = curves(full_runs)["heldout_mean"]
    best = min((e for e in range(epochs) if mean_curve[e] is not None), key=mean_curve.__getitem__)
    half = next(e for e in range(epochs // 2, epochs) if mean_curve[e - 1] is not None)
    return {
        "criterion": "mean improvement of the full arm's held-out loss over its last "
                     "(1 - delta) of epochs < sd of its final loss over seeds",
        "window_epochs": [start, epochs - 1], "improvement_per_seed": gains,
        "improvement": statistics.fmean(gains), "full_sd": sd,
        "met": statistics.fmean(gains) < sd,
        "second_half_from_epoch": half,
        "improvement_second_half": mean_curve[half - 1] - mean_curve[-1],
        "best_epoch": best, "rise_after_best": mean_curve[-1] - mean_curve[best],
    }


def verdict(arms: dict[str, dict], min_saved: float = 0.25) -> dict[str, Any]:
    """Lossless = within 2 full-data sd at >= ``min_saved`` of the samples saved."""
    out: dict[str, Any] = {"rule": f"|mean - full mean| <= 2 full sd, samples saved >= {min_saved:.0%}"}
    for name in ("infobatch", "infobatch_timestep", "random", "full_short"):
        if name in arms:
            a = arms[name]
            out[name] = {"lossless": a["within_2_full_sd"] and a["samples_saved"] >= min_saved,
                         "diff_in_full_sd": a["diff_in_full_sd"],
                         "samples_saved": a["samples_saved"]}
    for name in ("infobatch", "infobatch_timestep"):
        for control in ("random", "full_short"):
            if name in arms and control in arms:
                gap = arms[name]["mean"] - arms[control]["mean"]
                se = math.sqrt(arms[name]["sd"] ** 2 / len(arms[name]["seeds"])
                               + arms[control]["sd"] ** 2 / len(arms[control]["seeds"]))
                out[f"{name}_vs_{control}"] = {"gap": gap, "gap_se": se,
                                               "gap_in_full_sd": in_sd(gap, arms["full"]["sd"])}
    return out


def summarize(regime: dict[str, Any], results: dict[str, list[dict]]) -> dict[str, Any]:
    """The whole result: the regime, one entry per arm, the plateau criterion, the verdict."""
    full = results["full"]
    mean, sd = mean_sd([r["final_heldout_loss"] for r in full])
    ref = {"mean": mean, "sd": sd, "n": len(full), "delta": regime["delta"],
           "trained": statistics.fmean(r["trained"] for r in full),
           "wall": statistics.fmean(r["train_seconds"] for r in full),
           "cpu": statistics.fmean(r["train_cpu_seconds"] for r in full)}
    arms = {arm: summarize_arm(runs, ref) for arm, runs in results.items()}
    return {"regime": regime, "arms": arms, "plateau": plateau(regime["delta"], full),
            "verdict": verdict(arms)}


# -- plots --------------------------------------------------------------------------------

COLORS = {"full": "tab:blue", "infobatch": "tab:orange", "infobatch_timestep": "tab:red",
          "random": "tab:green", "full_short": "tab:purple"}


def evaluated_points(x: Any, y: list) -> tuple[list, list]:
    """The (x, y) pairs whose y was measured."""
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if b is not None]
    return [a for a, _ in pairs], [b for _, b in pairs]


def plot(result: dict[str, Any], path: str) -> None:
    """Held-out loss per epoch, per sample trained, and the last quarter up close."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for arm, a in result["arms"].items():
        c = a["curves"]
        epochs = range(1, len(c["heldout_mean"]) + 1)
        label = f"{arm} ({a['samples_saved']:.0%} saved)" if arm != "full" else arm
        axes[0].plot(*evaluated_points(epochs, c["heldout_mean"]), color=COLORS.get(arm),
                     label=label)
        for seen, held in zip(c["samples"], c["heldout"], strict=True):
            x, y = evaluated_points(seen, held)
            axes[1].plot(x, y, color=COLORS.get(arm), alpha=0.35, lw=0.8)
            tail = len(x) * 3 // 4
            axes[2].plot(x[tail:], y[tail:], ".-", color=COLORS.get(arm), alpha=0.6, lw=0.8)
        axes[1].plot(*evaluated_points(c["samples_mean"], c["heldout_mean"]), color=COLORS.get(arm))
    axes[0].set_xlabel("epoch")
    axes[1].set_xlabel("samples trained")
    axes[2].set_xlabel("samples trained (last quarter of each run, every seed)")
    for ax in axes[:2]:
        ax.set_yscale("log")
    axes[0].set_ylabel("held-out denoising loss (mean over seeds)")
    axes[0].legend(fontsize=8)
    r = result["regime"]
    fig.suptitle(f"{r['train_images']} faces at {r['image_size']}px, UNet {r['channels']}, "
                 f"{r['epochs']} epochs, {r['seeds']} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- the page's table ---------------------------------------------------------------------

def markdown(result: dict[str, Any]) -> str:
    """The per-arm table and the plateau line of docs/diffusion.md, from a result."""
    arms, p = result["arms"], result["plateau"]
    lines = [("| arm | epochs | held-out loss, mean ± sd | per seed | vs full | in full sd "
             "| samples saved | wall saved | CPU saved | score persistence |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in arms.items():
        persistence = "—" if a["score_persistence"] is None else f"{a['score_persistence']:+.3f}"
        lines.append(
            f"| {name} | {a['epochs']} | {a['mean']:.5f} ± {a['sd']:.5f} "
            f"| {', '.join(f'{v:.5f}' for v in a['final_heldout'])} "
            f"| {a['diff_vs_full_rel']:+.2%} "
            f"| {'—' if a['diff_in_full_sd'] is None else format(a['diff_in_full_sd'], '+.1f')} "
            f"| {a['samples_saved']:.1%} | {a['wall_saved']:.1%} | {a['cpu_saved']:.1%} "
            f"| {persistence} |")
    lines += ["", (f"Plateau criterion ({p['criterion']}): the full arm's loss improved by "
                  f"{p['improvement']:.5f} over epochs {p['window_epochs'][0]}-"
                  f"{p['window_epochs'][1]} (per seed: "
                  f"{', '.join(f'{g:.5f}' for g in p['improvement_per_seed'])}), against an sd "
                  f"of {p['full_sd']:.5f}: **{'met' if p['met'] else 'not met'}**.")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Print the table of a saved result; ``--plot PNG`` draws its curves again."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("result", help="a JSON written by bench/diffusion.py --out")
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    with open(args.result) as f:
        result = json.load(f)
    print(markdown(result))
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()

"""Render a results file of ``bench/run.py`` as docs/benchmarks.md, its JSON copy and plots.

Everything on the page comes from the results (numbers, verdicts, settings) or from the
prose here, which says what each number means and how it is measured. What was found and tried
where a goal is missed is written by hand in docs/benchmark-findings.md, which the page links.

    python bench/run.py --report-only bench/results.json     # re-render without running
"""

from __future__ import annotations

import json
import os
from typing import Any

MB = 1 << 20
# What was found and tried about the misses: prose kept by hand, beside the generated page.
FINDINGS_PAGE = "benchmark-findings.md"


# -- formatting --------------------------------------------------------------------------------

def fmt(value: Any, unit: str = "") -> str:
    """A number as a reader wants it: rates with separators, fractions as percentages."""
    if value is None:
        return "not measured"
    if isinstance(value, bool):
        return str(value)
    if not isinstance(value, (int, float)):
        return str(value)
    if unit == "fraction":
        return f"{100 * value:.2f}%"
    if unit == "points":  # a difference of two fractions
        return f"{100 * value:+.2f} points"
    if unit in ("samples/s", "keys/s"):
        return f"{value / 1e6:.2f}M {unit}" if value >= 1e5 else f"{value:,.0f} {unit}"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "B/key":
        return f"{value:.1f} B/key"
    if unit == "ratio":
        return f"{value:.2f}"
    if unit == "bytes":
        return f"{value / MB:.2f} MiB"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def verdict(ok: Any) -> str:
    return {True: "**pass**", False: "**MISS**", None: "not measured"}[ok]


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _section_error(section: dict[str, Any]) -> str | None:
    if "error" in section:
        tail = section.get("stderr", "").strip().splitlines()[-5:]
        return ("**This benchmark failed:** " + section["error"] + "\n\n```\n" + "\n".join(tail)
                + "\n```\n")
    return None


def _missing(section: dict[str, Any], source: str) -> str:
    missing = section.get("missing") or []
    if not missing:
        return ""
    return (f"\nNot reported by `{source}` in this run (left empty, not estimated): "
            + ", ".join(f"`{m}`" for m in missing) + ".\n")


# -- plots -------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lossless(lossless: dict[str, Any], path: str) -> bool:
    if "full_curve_mean" not in lossless:
        return False
    plt = _pyplot()
    fig, (acc, samples) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = range(len(lossless["full_curve_mean"]))
    styles = {"full": ("full data", "k", "-"), "infobatch": ("InfoBatch r=0.5", "C0", "-"),
              "random": ("random pruning, same budget", "C3", "--")}
    for arm, (label, color, line) in styles.items():
        acc.plot(epochs, [100 * a for a in lossless[f"{arm}_curve_mean"]], line, color=color, label=label)
        samples.plot(epochs, lossless[f"{arm}_samples_per_epoch"], line, color=color, label=label)
    from matplotlib.ticker import MaxNLocator

    for ax in (acc, samples):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.axvline(lossless["annealing_start"] - 0.5, color="0.6", lw=0.8, ls=":")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    acc.set_ylim(max(80, 100 * min(min(lossless[f"{a}_curve_mean"][2:]) for a in styles)) - 1, 100)
    acc.set_ylabel(f"test accuracy, mean of {lossless['seeds']} seeds (%)")
    samples.set_ylabel("samples trained in the epoch")
    samples.set_ylim(0, lossless["train_size"] * 1.05)
    acc.legend(loc="lower right")
    samples.text(lossless["annealing_start"] - 0.4, lossless["train_size"] * 0.05, "annealing",
                 color="0.4")
    fig.suptitle(f"digits, {lossless['epochs']} epochs: InfoBatch trains "
                 f"{100 * lossless['samples_saved']:.1f}% fewer samples")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_bookkeeping(bookkeeping: dict[str, Any], path: str) -> bool:
    if "reference_breakdown" not in bookkeeping:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    variants = [("ours_str", "ours, __key__ strings"), ("ours_hash", "ours, __key_hash__ tensor"),
                ("ours_overlap", "ours, strings, end_epoch(wait=False)"),
                ("reference", "official InfoBatch")]
    variants = [(v, label) for v, label in variants if f"{v}_breakdown" in bookkeeping]
    parts = [("update_s", "update (every batch)", "C0"), ("commit_s", "commit (in end_epoch)", "C1"),
             ("wait_s", "waiting for an overlapped commit", "C3"),
             ("plan_s", "plan / prune the next epoch", "C2")]
    for row, (variant, _) in enumerate(variants):
        left = 0.0
        for field, label, color in parts:
            width = bookkeeping[f"{variant}_breakdown"].get(field, 0.0)
            ax.barh(row, width, left=left, color=color, label=label if row == 0 else None)
            left += width
        ax.text(left, row, f"  {left:.3f} s", va="center")
    ax.set_yticks(range(len(variants)), [label for _, label in variants])
    ax.invert_yaxis()
    ax.set_xlabel(f"seconds per epoch that block the training loop (N = {bookkeeping['n']:,})")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8)
    ax.set_xlim(0, 1.25 * max(bookkeeping[f"{v}_s"] for v, _ in variants))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_workers(workers: dict[str, Any], path: str) -> bool:
    if "snapshot_bytes" not in workers:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    bars = [("RSS growth", workers["rss_growth_per_worker_bytes"], "0.6"),
            ("of it: snapshot pages mapped", workers["snapshot_rss_per_worker_bytes"], "0.8"),
            ("private (USS) growth", workers["private_growth_per_worker_bytes"], "C0"),
            ("private, no stage (control)", workers["control_private_growth_per_worker_bytes"], "C2")]
    for row, (_, value, color) in enumerate(bars):
        ax.barh(row, value / MB, color=color)
        ax.text(value / MB, row, f"  {value / MB:.1f} MiB", va="center")
    goal = 0.05 * workers["snapshot_bytes"] / MB
    ax.axvline(goal, color="C3", ls="--", label=f"goal: 5% of the snapshot ({goal:.1f} MiB)")
    ax.set_yticks(range(len(bars)), [b[0] for b in bars])
    ax.invert_yaxis()
    ax.set_xlabel(f"MiB per worker ({workers['workers']} workers, snapshot "
                  f"{workers['snapshot_bytes'] / MB:.0f} MiB, {workers['keys']:,} keys)")
    ax.set_xlim(0, 1.3 * max(b[1] for b in bars) / MB)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- the page ------------------------------------------------------------------------------------

def render(results: dict[str, Any], plots: dict[str, str]) -> str:
    meta = results.get("meta", {})
    machine = meta.get("machine", {})
    quick = meta.get("quick")
    out: list[str] = []
    w = out.append
    w("# Benchmarks\n")
    w("<!-- Generated by bench/run.py (bench/report.py); edit those, not this file. -->\n")
    w(f"Measured {meta.get('date', '?')} with `{meta.get('command', '?')}` at commit "
      f"`{meta.get('git_commit')}`, in {meta.get('seconds', 0):.0f} s, on {machine.get('cpus')} "
      f"cores ({machine.get('cpu') or 'unknown CPU'}), {machine.get('platform')}; Python "
      f"{machine.get('python')}, torch {machine.get('torch')}, numpy {machine.get('numpy')}, "
      f"pyarrow {machine.get('pyarrow')}, webdataset {machine.get('webdataset')}. Load average "
      f"at start / end: {_load(machine.get('load_average_at_start'))} / "
      f"{_load(machine.get('load_average_at_end'))}: the machine is shared, so every comparison "
      f"below is measured side by side in one process run, interleaved, and summarised by medians.\n")
    if quick:
        w("This is a **`--quick`** run: smaller sizes where a section says so (the store and "
          "the worker snapshot at 5M keys, fewer repetitions, seeds and epochs). "
          "`python bench/run.py` runs the full sizes.\n")
    w("## Goals\n")
    rows = [[g["name"], g["goal"], fmt(g["measured"], g.get("unit", "")), verdict(g["pass"]),
             g.get("note", "")] for g in results.get("goals", [])]
    w(table(["goal", "target", "measured", "verdict", "measured at / note"], rows) + "\n")
    w("What each figure means and how it is measured follows section by section; then each "
      "missed goal with this run's figures that bear on it. What was found and tried about the "
      f"misses: [{FINDINGS_PAGE}]({FINDINGS_PAGE}).\n")
    w(HOW_TO_RUN)
    w(stage_section(results.get("stage", {})))
    w(store_section(results.get("store", {})))
    w(bookkeeping_section(results.get("bookkeeping", {}), plots.get("bookkeeping")))
    w(workers_section(results.get("workers", {}), plots.get("workers")))
    w(lossless_section(results.get("lossless", {}), plots.get("lossless")))
    w(findings(results))
    return "\n".join(out)


def _load(value: Any) -> str:
    return "?" if not value else ", ".join(f"{v:.1f}" for v in value)


HOW_TO_RUN = """## How to run

```
python bench/run.py --quick     # every benchmark at small sizes (the time it took: above)
python bench/run.py             # full sizes (10M-key store and worker snapshot, 5 seeds)
python bench/run.py --only bookkeeping workers --no-docs --out /tmp/r.json
python bench/run.py --report-only bench/results.json   # re-render this page
```

`bench/run.py` runs each benchmark in its own process, one after the other, and reads the
JSON each prints: `bench/stage.py`, `bench/store.py`, `bench/bookkeeping.py`,
`bench/workers.py`, `bench/lossless.py` (each also runs alone and prints its JSON). The
results go to `bench/results.json` (not committed) and, with this page and its plots, to
`docs/benchmarks.json`.
"""


def stage_section(stage: dict[str, Any]) -> str:
    error = _section_error(stage)
    head = "## The stage in a pipeline (`bench/stage.py`)\n\n"
    if error:
        return head + error
    rows = [
        ["raw_samples_per_s", fmt(stage.get("raw_samples_per_s"), "samples/s"),
         "tar reading alone (no decode), local JPEG shards"],
        ["staged_samples_per_s", fmt(stage.get("staged_samples_per_s"), "samples/s"),
         "the same shards through `InfoBatch.stage()`, per input sample (the worse epoch)"],
        ["overhead", fmt(stage.get("overhead"), "fraction"),
         "1 - staged/raw: `bench/stage.py`'s headline, the worse of the two epochs below"],
        ["overhead, epoch that does not prune", fmt(stage.get("overhead_not_pruning"), "fraction"),
         "every key still hashed, looked up and weighted; median of paired repetitions"],
        ["overhead, pruning epoch", fmt(stage.get("overhead_pruning"), "fraction"),
         "the same in an epoch that drops ~30% of the samples"],
        ["overhead, wall clock", fmt(stage.get("overhead_wall"), "fraction"),
         "the worse epoch again, on wall clock instead of process CPU time"],
        ["overhead_from_stage_cost", fmt(stage.get("overhead_from_stage_cost"), "fraction"),
         "the stage's own cost per sample (measured alone) / the raw pipeline's"],
        ["stage_alone_samples_per_s", fmt(stage.get("stage_alone_samples_per_s"), "samples/s"),
         "the stage on in-memory samples, one core"],
        ["pruned_fraction", fmt(stage.get("pruned_fraction"), "fraction"),
         "share of the samples the pruning epoch dropped"],
        ["decode_time_saved", fmt(stage.get("decode_time_saved"), "fraction"),
         "share of `.decode('rgb')` pipeline time saved in the pruning epoch (pruned before decode)"],
    ]
    text = head + table(["field", "value", "meaning"], rows) + "\n"
    spread = [(label, stage.get(field)) for label, field in (
        ("the non-pruning epoch", "overhead_not_pruning_quartiles"),
        ("the pruning epoch", "overhead_pruning_quartiles"),
        ("the raw pipeline against itself (A/A)", "noise_floor_quartiles")) if stage.get(field)]
    if spread:
        text += ("\nInterquartile ranges over the repetitions (clock: " + str(stage.get("clock"))
                 + "): " + "; ".join(f"{label} [{100 * q[0]:.1f}%, {100 * q[1]:.1f}%]"
                                     for label, q in spread)
                 + ". Where the A/A spread is wider than 1%, this machine cannot resolve the 1% "
                   "goal from pipeline timings; `overhead_from_stage_cost` (the stage timed alone, "
                   "over the raw pipeline's time per sample) is the figure free of the tar "
                   "reader's noise.\n")
    return text + _missing(stage, "bench/stage.py")


def store_section(store: dict[str, Any]) -> str:
    error = _section_error(store)
    head = "## The score store (`bench/store.py`)\n\n"
    if error:
        return head + error
    rows = [
        ["keys", fmt(store.get("keys")), "size of the store measured (the largest size run)"],
        ["record_keys_per_s", fmt(store.get("record_keys_per_s"), "keys/s"),
         "`DeltaWriter.record` of key strings in batches, plus the final flush (sort + write)"],
        ["record_u64_keys_per_s", fmt(store.get("record_u64_keys_per_s"), "keys/s"),
         "the same with precomputed uint64 hashes (`__key_hash__`)"],
        ["commit_s", fmt(store.get("commit_s"), "s"),
         "merge of the previous snapshot with one epoch's deltas (every key updated)"],
        ["commit_s_per_10M_keys", fmt(store.get("commit_s_per_10M_keys"), "s"),
         "commit_s scaled to 10M keys (equal to commit_s in the full run)"],
        ["commit_peak_bytes_per_key", fmt(store.get("commit_peak_bytes_per_key"), "B/key"),
         "peak RSS growth of the commit / keys (counts mapped page-cache pages too)"],
        ["commit_peak_anon_bytes_per_key", fmt(store.get("commit_peak_anon_bytes_per_key"), "B/key"),
         "peak anonymous (private) memory growth / keys"],
        ["lookup_keys_per_s", fmt(store.get("lookup_keys_per_s"), "keys/s"),
         "batched lookup of 1M existing uint64 hashes in a mapped snapshot"],
        ["lookup_str_keys_per_s", fmt(store.get("lookup_str_keys_per_s"), "keys/s"),
         "the same from key strings (hashing included)"],
    ]
    text = head + table(["field", "value", "meaning"], rows) + "\n"
    sizes = store.get("sizes") or {}
    if len(sizes) > 1:
        text += "\nBy size:\n\n" + table(
            ["keys", "record (str)", "record (u64)", "commit", "commit peak RSS", "lookup"],
            [[fmt(int(n)), fmt(r.get("record_str_keys_per_s"), "keys/s"),
              fmt(r.get("record_u64_keys_per_s"), "keys/s"), fmt(r.get("commit_s"), "s"),
              fmt(r.get("commit_peak_rss_bytes_per_key"), "B/key"),
              fmt(r.get("lookup_batched_keys_per_s"), "keys/s")]
             for n, r in sorted(sizes.items(), key=lambda kv: int(kv[0]))]) + "\n"
    return text + _missing(store, "bench/store.py")


def bookkeeping_section(bk: dict[str, Any], plot: str | None) -> str:
    error = _section_error(bk)
    head = "## Bookkeeping that blocks the training loop (`bench/bookkeeping.py`)\n\n"
    if error:
        return head + error
    if "reference_s" not in bk:
        return head + "Not run.\n"
    text = head + BOOKKEEPING_INTRO.format(n=bk["n"], batch=bk["batch_size"],
                                           epochs=len(bk["measured_epochs"])) + "\n"
    rows = []
    for variant, label in (("ours_str", "ours, `__key__` strings"),
                           ("ours_hash", "ours, `__key_hash__` tensor"),
                           ("ours_overlap", "ours, strings, `end_epoch(wait=False)`"),
                           ("reference", "official InfoBatch (re-implemented)")):
        if f"{variant}_breakdown" not in bk:
            continue
        b = bk[f"{variant}_breakdown"]
        wait = fmt(b["wait_s"], "s") if "wait_s" in b else "-"
        rows.append([label, fmt(b["update_s"], "s"), fmt(b["commit_s"], "s"), wait,
                     fmt(b["plan_s"], "s"), f"**{bk[f'{variant}_s']:.3f} s**", fmt(int(b["samples"]))])
    text += table(["variant", "update (all batches)", "commit (in end_epoch)", "wait", "plan",
                   "blocking per epoch", "samples trained"], rows) + "\n"
    cpu = (f" On the process's CPU time (blind to the commit's fsync waits, less disturbed by "
           f"other tenants): {bk['ratio_cpu']:.2f} and {bk['ratio_hash_cpu']:.2f}."
           if "ratio_cpu" in bk else "")
    text += (f"\n`ratio` = ours (strings) / reference = **{bk['ratio']:.2f}**; with hash tensors "
             f"**{bk['ratio_hash']:.2f}**.{cpu} Not counted in the reference: its sampler's per-sample "
             f"iteration in the training process (`IBSampler.__next__`, one Python call per "
             f"index, pulled by the BatchSampler), {bk['reference_sampler_s']:.3f} s per epoch "
             f"here; ours has no equivalent in the training process (the stage runs in the "
             f"DataLoader workers).\n")
    if "ratio_blocking" in bk:
        text += (f"\nWith the commit overlapped (`end_epoch(wait=False)`, then a simulated "
                 f"evaluation of {bk['eval_s']:g} s that is not counted, then `metrics()`, which "
                 f"waits for what is left of the commit), the training loop is blocked "
                 f"{bk['ours_overlap_s']:.3f} s per epoch: `ratio_blocking` = "
                 f"**{bk['ratio_blocking']:.2f}** (goal <= 0.25). The commit itself took "
                 f"{bk['overlap_commit_s']:.3f} s beside the evaluation.\n")
    if plot:
        text += f"\n![bookkeeping per epoch]({plot})\n"
    return text + BOOKKEEPING_REFERENCE


BOOKKEEPING_INTRO = """Per epoch, at N = {n:,} keys (ImageNet-1K's training set), batch {batch}:
the median over {epochs} pruning epochs (after a warm-up epoch 0, in which nothing is known
and nothing pruned) of the time the training process spends on bookkeeping:

- **update**: every batch's `update` call, summed. Ours: `InfoBatch.update(loss, keys,
  weights)` (records each sample's loss, returns the weighted mean) with the keys as the
  trainer receives them from the DataLoader, ImageNet-style strings such as
  `"n01440764_10026"`, or the stage's `__key_hash__` int64 tensor. Before each call, outside
  the timing, the batch is made as the DataLoader hands it over: its tensors from numpy, its
  strings unpickled (fresh in the cache, as they come from a worker's queue).
- **commit**: ours only: `InfoBatch.end_epoch()` (flush the last delta, merge the
  snapshot, write it and the manifest; a local store on disk, with its fsyncs).
- **plan**: ours: `InfoBatch.plan(N)` for the coming epoch (opens and verifies the new
  snapshot, counts exactly what the epoch keeps); the official code's equivalent is what its
  sampler does when an epoch starts: `np.random.seed(epoch)` and `InfoBatch.prune()`.

A fourth variant ends each epoch as a GPU job would: `end_epoch(wait=False)` hands the
commit to a thread, a simulated evaluation (a sleep: on a GPU machine evaluation keeps the
GPU busy and leaves the CPU to the commit) runs meanwhile and is not counted, and
`metrics()` then waits for whatever of the commit is left (**wait**). Only the time the
training loop is blocked counts.

The variants run interleaved, epoch by epoch, in a rotating order, on the same losses
(a fresh right-skewed draw each epoch).
"""

BOOKKEEPING_REFERENCE = """
**What the reference does.** `OfficialBookkeeping` in `bench/bookkeeping.py` re-implements
the official map-style InfoBatch (github.com/NUS-HPC-AI-Lab/InfoBatch,
`infobatch/infobatch.py`: `InfoBatch.update`, `InfoBatch.prune`, `IBSampler.reset`) line for
line, in one process: the scores are a float32 torch tensor initialised to 3; each batch's
`update` gathers the batch's weights by index from a weights tensor, scatters the
losses into the scores (`scores[indices] = losses`), multiplies the losses by the weights in
place and returns their mean. When an epoch starts, `prune` takes the scores' mean,
`well_learned = scores < mean`, keeps exactly `int(keep_ratio * len(well_learned))` of them
with `np.random.choice(..., replace=False)`, resets the weights tensor to 1 and sets the kept
well-learned ones to `1 / keep_ratio`, builds the kept index list (the other indices
`.tolist()`, extended with the chosen ones) and shuffles it with `np.random.shuffle`. It
keeps nothing on disk: no checkpoint of scores, nothing shared between processes or ranks
(under DDP it all-gathers indices and losses every step, which single-process timing leaves
out).
"""


def workers_section(workers: dict[str, Any], plot: str | None) -> str:
    error = _section_error(workers)
    head = "## Worker memory (`bench/workers.py`)\n\n"
    if error:
        return head + error
    if "snapshot_bytes" not in workers:
        return head + "Not run.\n"
    snap = workers["snapshot_bytes"]
    rows = [
        ["snapshot_bytes", fmt(snap, "bytes"), f"the snapshot file ({workers['keys']:,} keys)"],
        ["rss_growth_per_worker_bytes", fmt(workers["rss_growth_per_worker_bytes"], "bytes"),
         (f"{100 * workers['rss_growth_fraction']:.0f}% of the snapshot: RSS counts the mapped "
          "file pages, which every worker shares through the page cache")],
        ["snapshot_rss_per_worker_bytes", fmt(workers["snapshot_rss_per_worker_bytes"], "bytes"),
         "pages of the snapshot file mapped in each worker"],
        ["snapshot_private_per_worker_bytes", fmt(workers["snapshot_private_per_worker_bytes"], "bytes"),
         "of those, pages only this worker maps: a per-worker copy would show here"],
        ["private_growth_per_worker_bytes (goal)",
         fmt(workers["private_growth_per_worker_bytes"], "bytes"),
         (f"**{100 * workers['private_growth_fraction']:.1f}%** of the snapshot: USS growth, "
          "the goal's measure")],
        ["heap_anon_private_growth_per_worker_bytes",
         fmt(workers["heap_anon_private_growth_per_worker_bytes"], "bytes"),
         "of it, in the heap and anonymous mappings"],
        ["control_private_growth_per_worker_bytes",
         fmt(workers["control_private_growth_per_worker_bytes"], "bytes"),
         "the same workers and samples with an identity stage instead of ours"],
        ["net of the control", fmt(workers["private_growth_per_worker_bytes"]
                                   - workers["control_private_growth_per_worker_bytes"], "bytes"),
         f"{100 * workers['net_private_growth_fraction']:.1f}% of the snapshot"],
        ["stage_samples_per_s_per_worker", fmt(workers["stage_samples_per_s_per_worker"], "samples/s"),
         f"{workers['workers']} workers sharing {os.cpu_count()} cores, key strings formatted on the fly"],
    ]
    text = head + WORKERS_INTRO.format(workers=workers["workers"], keys=workers["keys"]) + "\n"
    text += table(["field", "value", "meaning"], rows) + "\n"
    if plot:
        text += f"\n![worker memory]({plot})\n"
    return text


WORKERS_INTRO = """{workers} real `torch.utils.data.DataLoader` worker processes (fork) each run
`InfoBatch.stage()` over a quarter of {keys:,} keys, all of which are in one committed snapshot.
The stage opens the snapshot (verifying the checksum of every column: the whole file is read,
through the page cache), then hashes, looks up, draws and weights every sample. Each
worker reads `/proc/self/smaps_rollup` and `/proc/self/smaps` when it starts iterating (before
the stage opens the snapshot) and after its last sample, while every worker still maps the
snapshot (a barrier): a page mapped by one process alone counts as private, so a worker that
measured after the others had finished would see shared pages as its own.
**The goal's measure is the USS growth** (`Private_Clean + Private_Dirty`); RSS is reported
beside it because it is what `top` shows, and it counts the shared file pages in full.
"""


def lossless_section(ll: dict[str, Any], plot: str | None) -> str:
    error = _section_error(ll)
    head = "## Is it lossless? (`bench/lossless.py`)\n\n"
    if error:
        return head + error
    if "full_acc_mean" not in ll:
        return head + "Not run.\n"
    text = head + LOSSLESS_INTRO.format(**ll) + "\n"
    rows = []
    for arm, label in (("full", "full data"), ("infobatch", "InfoBatch r=0.5, delta=0.875"),
                       ("random", "random pruning, same budget")):
        rows.append([label, f"{100 * ll[f'{arm}_acc_mean']:.2f}%", f"{100 * ll[f'{arm}_acc_std']:.2f}",
                     " ".join(f"{100 * a:.1f}" for a in ll[f"{arm}_accs"]),
                     fmt(ll[f"{arm}_samples_saved"], "fraction"), f"{ll[f'{arm}_wall_s']:.1f} s"])
    text += table(["arm", "test accuracy (mean)", "std (points)", "per seed", "samples saved",
                   "wall per run (median)"], rows) + "\n"
    text += (f"\n`samples_saved` (InfoBatch, measured) = **{100 * ll['samples_saved']:.2f}%**; "
             f"`theory_saved` = **{100 * ll['theory_saved']:.2f}%** (random pruning: measured "
             f"{100 * ll['random_samples_saved']:.2f}%, its plans {100 * ll['random_theory_saved']:.2f}%). "
             f"Wall time saved by InfoBatch against full data: {100 * ll['wall_saved']:.1f}% "
             f"(medians of {ll['seeds']} runs per arm on a shared machine, so only roughly: every "
             f"sample is still read from the tar shards; pruned ones skip decode, forward and "
             f"backward; the per-epoch commit and evaluation are not pruned).\n")
    if plot:
        text += f"\n![lossless]({plot})\n"
    return text


LOSSLESS_INTRO = """{dataset} ({train_size} training, {test_size} test images), {model}, batch
{batch_size}, {optimizer}; {epochs} epochs (annealing from epoch {annealing_start}), {seeds}
seeds per arm. Every run reads the training split from webdataset tar shards through
`InfoBatch.stage()`, a full shuffle, decode and batching, and trains with
`InfoBatch.update(per-sample loss, keys, weights)`; each epoch ends with the store's commit.
The arms: full data (the same pipeline with `prune_ratio=0`), InfoBatch, and random pruning
(`policy="random"`: every known sample dropped with probability `r x P(score < mean)`,
InfoBatch's expected budget, weight 1). A seed fixes the model's initialisation, the shuffle
and the pruning draws. `samples_saved` counts the samples actually trained over the run
against `epochs x train size`; `theory_saved` sums `InfoBatch.plan(train size)
.expected_saved_fraction x train size` taken before each epoch, over the same denominator.
"""

def findings(results: dict[str, Any]) -> str:
    """The missed goals, each with this run's figures that bear on it (the bookkeeping and
    worker figures always). What was found and tried about a miss is on ``FINDINGS_PAGE``."""
    goals = {g["name"]: g for g in results.get("goals", [])}
    missed = [name for name, g in goals.items() if g["pass"] is False]
    out = ["## Missed goals\n"]
    w = out.append
    w(("Missed in this run: " + "; ".join(missed) + "." if missed
       else "This run missed no goal it measured.")
      + f" Why, what was tried and what is left: [{FINDINGS_PAGE}]({FINDINGS_PAGE}).\n")
    bk = results.get("bookkeeping", {})
    if "ratio" in bk:
        w(_bookkeeping_finding(bk, goals))
        if "ratio_blocking" in bk:
            w(_blocking_finding(bk, goals))
    workers = results.get("workers", {})
    if "private_growth_fraction" in workers:
        w(_workers_finding(workers, goals))
    stage = results.get("stage", {})
    if goals.get("stage overhead", {}).get("pass") is False:
        w(_stage_finding(stage))
    decode = (stage.get("raw") or {}).get("decode") or {}
    if goals.get("decode time saved", {}).get("pass") is False and decode:
        w(f"**Decode time saved** ({100 * stage['decode_time_saved']:.1f}% against "
          f"{100 * stage['pruned_fraction']:.1f}% of the samples pruned). A pruned sample is "
          f"still read from the tar before its key is known: reading is "
          f"{100 * (1 - decode['prunable_share']):.0f}% of the pipeline's time here, "
          f"so at most {100 * decode['expected_saved_if_decode_is_skipped']:.1f}% can be "
          f"saved.\n")
    store = results.get("store", {})
    if goals.get("commit peak memory", {}).get("pass") is False:
        keys = store.get("keys") or 0
        w(f"**Commit peak memory** ({fmt(store.get('commit_peak_bytes_per_key'), 'B/key')} of peak "
          f"RSS growth, {fmt(store.get('commit_peak_anon_bytes_per_key'), 'B/key')} of it anonymous, "
          f"at {keys:,} keys). "
          + ("The goal is set for 10M keys, which the full run measures; at this size whatever "
             "the commit costs regardless of size is divided by few keys. "
             if keys < 10_000_000 else "")
          + "`bench/store.py` has the breakdown.\n")
    if goals.get("record (key strings)", {}).get("pass") is False:
        w(f"**Record with key strings** ({fmt(store.get('record_keys_per_s'), 'keys/s')}) is bound "
          f"by hashing: one xxh3 call per Python string. Passing the stage's `__key_hash__` tensor "
          f"instead records at {fmt(store.get('record_u64_keys_per_s'), 'keys/s')}.\n")
    return "\n".join(out)


def _bookkeeping_finding(bk: dict[str, Any], goals: dict[str, dict]) -> str:
    ours, ours_hash, ref = bk["ours_str_breakdown"], bk["ours_hash_breakdown"], bk["reference_breakdown"]

    def per_batch(b: dict[str, Any]) -> float:  # microseconds of update per batch
        return 1e6 * b["update_s"] / max(1, b["samples"] / bk["batch_size"])

    met = "met" if goals.get("bookkeeping vs official", {}).get("pass") else "missed"
    cpu = f"; on CPU time {bk['ratio_cpu']:.2f} / {bk['ratio_hash_cpu']:.2f}" if "ratio_cpu" in bk else ""
    budget = 0.25 * bk["reference_s"]
    return (
        f"**Bookkeeping ({met}: {bk['ratio']:.2f} with key strings, {bk['ratio_hash']:.2f} with "
        f"hash tensors, goal 0.25{cpu}).** The official code's whole epoch of bookkeeping takes "
        f"{bk['reference_s']:.3f} s at N = {bk['n']:,} ({ref['plan_s']:.3f} s of `prune`, a few "
        f"vectorised passes over the N scores and one list shuffle, and {per_batch(ref):.0f} us "
        f"of torch indexing per batch); it keeps nothing durable. Ours spends "
        f"{per_batch(ours_hash):.0f} us per batch in `update` with hash tensors "
        f"({per_batch(ours):.0f} us with key strings), {ours['commit_s']:.3f} s in the commit and "
        f"{ours['plan_s']:.3f} s in planning. A ratio of 0.25 would leave {budget:.3f} s per "
        f"epoch for all three"
        + (f": less than our commit alone, which sorts the epoch's ~{ours['samples'] / 1e6:.2f}M "
           f"updates, merges them into the snapshot, writes it and fsyncs it."
           if budget < ours["commit_s"] else ".") + "\n")


def _blocking_finding(bk: dict[str, Any], goals: dict[str, dict]) -> str:
    over, ours_hash, ref = (bk["ours_overlap_breakdown"], bk["ours_hash_breakdown"],
                            bk["reference_breakdown"])

    def per_batch(b: dict[str, Any]) -> float:  # microseconds of update per batch
        return 1e6 * b["update_s"] / max(1, b["samples"] / bk["batch_size"])

    met = "met" if goals.get("bookkeeping vs official, commit overlapped", {}).get("pass") else "missed"
    return (
        f"**Blocking bookkeeping with the commit overlapped ({met}: {bk['ratio_blocking']:.2f}, "
        f"goal 0.25).** `end_epoch(wait=False)` takes the commit off the loop "
        f"({over['commit_s']:.4f} s to hand it over, {over['wait_s']:.4f} s left to wait after a "
        f"{bk['eval_s']:g} s evaluation); what remains is `update` ({per_batch(over):.0f} us per "
        f"batch with key strings, {per_batch(ours_hash):.0f} us with hash tensors, against the "
        f"reference's {per_batch(ref):.0f} us) and planning ({over['plan_s']:.3f} s).\n")


def _workers_finding(wk: dict[str, Any], goals: dict[str, dict]) -> str:
    met = "met" if goals.get("worker memory", {}).get("pass") else "missed"
    return (
        f"**Worker memory ({met}: {100 * wk['private_growth_fraction']:.1f}% of a "
        f"{wk['snapshot_bytes'] / MB:.0f} MiB snapshot, goal 5%).** The snapshot itself is "
        f"shared: {wk['snapshot_private_per_worker_bytes'] / MB:.2f} MiB of its pages are private "
        f"to a worker, {wk['snapshot_rss_per_worker_bytes'] / MB:.1f} MiB mapped and shared. The "
        f"growth is in the heap and anonymous mappings "
        f"({wk['heap_anon_private_growth_per_worker_bytes'] / MB:.1f} MiB); iterating the same "
        f"samples with no stage at all costs "
        f"{wk['control_private_growth_per_worker_bytes'] / MB:.1f} MiB (the control).\n")


def _stage_finding(stage: dict[str, Any]) -> str:
    noise = stage.get("noise_floor_quartiles")
    window_only = ((stage.get("raw") or {}).get("pipeline") or {}).get("window_only", {})
    return (
        f"**Stage overhead** ({fmt(stage.get('overhead'), 'fraction')} in the pipeline, goal 1%). "
        + (f"The raw pipeline timed against itself spreads over [{100 * noise[0]:.1f}%, "
           f"{100 * noise[1]:.1f}%] (interquartile), " if noise else "")
        + "while the stage's own cost, timed alone, is "
        f"{fmt(stage.get('overhead_from_stage_cost'), 'fraction')} of the raw pipeline's time "
        f"per sample ({fmt(stage.get('stage_alone_samples_per_s'), 'samples/s')} "
        f"alone against {fmt(stage.get('raw_samples_per_s'), 'samples/s')} of tar reading). "
        f"The rest is what holding samples a window at a time costs the tar reader around it "
        f"(cache and allocator effects): the do-nothing `window_only` control costs "
        f"{fmt(window_only.get('overhead'), 'fraction')} by itself. "
        f"`python bench/stage.py --instructions` counts the stage in instructions instead "
        f"(cachegrind), which the machine's noise does not touch.\n")


# -- writing -----------------------------------------------------------------------------------

def write_docs(results: dict[str, Any], docs: str) -> list[str]:
    """Write benchmarks.md, benchmarks.json and the plots into ``docs``; returns the paths."""
    os.makedirs(docs, exist_ok=True)
    written = []
    plots = {}
    for name, plotter in (("lossless", plot_lossless), ("bookkeeping", plot_bookkeeping),
                          ("workers", plot_workers)):
        section = results.get(name, {})
        path = os.path.join(docs, f"benchmarks-{name}.png")
        if "error" not in section and plotter(section, path):
            plots[name] = os.path.basename(path)
            written.append(path)
    page = os.path.join(docs, "benchmarks.md")
    with open(page, "w") as sink:
        sink.write(render(results, plots))
    written.append(page)
    copy = os.path.join(docs, "benchmarks.json")
    with open(copy, "w") as sink:
        json.dump(results, sink, indent=1)
        sink.write("\n")
    written.append(copy)
    return written

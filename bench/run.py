"""Run every benchmark side by side, judge the goals, write the JSON and docs/benchmarks.md.

    python bench/run.py [--quick] [--out PATH] [--docs DIR]
    python bench/run.py --report-only PATH      # re-render the docs from a results file

Each benchmark runs in its own process, one after the other (on a shared 2-core machine two
timed runs at once would measure each other): ``bench/stage.py``, ``bench/store.py``,
``bench/bookkeeping.py``, ``bench/workers.py``, ``bench/lossless.py``; each prints one JSON
object. Their fields are mapped here onto the issue's names (``stage``, ``store``,
``bookkeeping``, ``workers``, ``lossless``); a field a benchmark does not report is listed
under ``missing`` in its section, never invented. Each goal is judged on what was measured
(``pass`` is None where the figure is missing), the results go to ``--out`` (default
``bench/results.json``, not committed) and, unless ``--no-docs``, to ``<docs>/benchmarks.json``
beside the regenerated ``<docs>/benchmarks.md`` and its plots.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
ORDER = ("stage", "store", "bookkeeping", "workers", "lossless")
SCRIPTS = {name: os.path.join(BENCH, f"{name}.py") for name in ORDER}
TIMEOUT_S = {"quick": 900, "full": 4 * 3600}
if BENCH not in sys.path:  # report.py sits beside this file; bench/ is not a package
    sys.path.insert(0, BENCH)


# -- running ---------------------------------------------------------------------------------

def parse_json_output(stdout: str) -> dict[str, Any]:
    """The JSON object a benchmark printed (the last one, if it printed other lines first)."""
    try:
        return json.loads(stdout)
    except ValueError:
        pass
    decoder = json.JSONDecoder()
    found = None
    for start in (i for i, c in enumerate(stdout) if c == "{" and (i == 0 or stdout[i - 1] == "\n")):
        try:
            found, _ = decoder.raw_decode(stdout, start)
        except ValueError:
            continue
    if found is None:
        raise ValueError(f"no JSON object in the output: {stdout[-300:]!r}")
    return found


def run_benchmark(name: str, quick: bool, extra: list[str] | None = None) -> dict[str, Any]:
    """Run one benchmark script; its JSON, or ``{"error": ...}`` (with its stderr's end)."""
    command = [sys.executable, SCRIPTS[name]] + (["--quick"] if quick else []) + (extra or [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.join(ROOT, "src"), BENCH, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env,
                              timeout=TIMEOUT_S["quick" if quick else "full"])
    except subprocess.TimeoutExpired as exc:
        return {"error": f"timed out after {exc.timeout} s", "command": _shell(command)}
    seconds = time.perf_counter() - start
    meta = {"command": _shell(command), "seconds": seconds}
    if done.returncode != 0:
        return {"error": f"exit status {done.returncode}", "stderr": done.stderr[-3000:], **meta}
    try:
        return {"output": parse_json_output(done.stdout), **meta}
    except ValueError as exc:
        return {"error": str(exc), "stderr": done.stderr[-3000:], **meta}


def _shell(command: list[str]) -> str:
    return " ".join(shlex.quote(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c)
                    for c in command)


# -- mapping each benchmark's output onto the fields -------------------------------

def _take(source: dict[str, Any], fields: dict[str, Callable[[dict], Any]]) -> dict[str, Any]:
    """``{name: getter(source)}``; a getter that finds nothing lists the name under ``missing``."""
    out: dict[str, Any] = {}
    missing = []
    for name, getter in fields.items():
        try:
            value = getter(source)
        except (KeyError, TypeError, IndexError, ValueError, ZeroDivisionError):
            value = None
        if value is None:
            missing.append(name)
        out[name] = value
    out["missing"] = missing
    return out


def map_stage(out: dict[str, Any]) -> dict[str, Any]:
    section = _take(out, {
        "raw_samples_per_s": lambda o: o["raw_samples_per_s"],
        "staged_samples_per_s": lambda o: o["staged_samples_per_s"],
        "overhead": lambda o: o["overhead"],
        "stage_alone_samples_per_s": lambda o: o["stage_alone_samples_per_s"],
        "decode_time_saved": lambda o: o["decode_time_saved"],
        "pruned_fraction": lambda o: o["pruned_fraction"],
        "overhead_pruning": lambda o: o["pipeline"]["pruning"]["overhead"],
        "overhead_not_pruning": lambda o: o["pipeline"]["not_pruning"]["overhead"],
        "overhead_pruning_quartiles": lambda o: o["pipeline"]["pruning"]["overhead_quartiles"],
        "overhead_not_pruning_quartiles": lambda o: o["pipeline"]["not_pruning"]["overhead_quartiles"],
        "overhead_wall": lambda o: max(o["pipeline"]["pruning"]["overhead_wall"],
                                       o["pipeline"]["not_pruning"]["overhead_wall"]),
        "noise_floor_quartiles": lambda o: o["pipeline"]["raw_again"]["overhead_quartiles"],
        "overhead_from_stage_cost": lambda o: o["overhead_from_stage_cost"],
        "clock": lambda o: o["clock"],
        "settings": lambda o: o["settings"],
    })
    section["own_goals"] = out.get("goals")
    return section


def _store_size(out: dict[str, Any]) -> dict[str, Any]:
    """The largest size store.py measured (10M keys in the full run)."""
    results = out["results"]
    return results[max(results, key=int)]


def map_store(out: dict[str, Any]) -> dict[str, Any]:
    section = _take(out, {
        "keys": lambda o: _store_size(o)["keys"],
        # the trainer's default: key strings as the DataLoader collates them
        "record_keys_per_s": lambda o: _store_size(o)["record_str_keys_per_s"],
        "record_u64_keys_per_s": lambda o: _store_size(o)["record_u64_keys_per_s"],
        "commit_s": lambda o: _store_size(o)["commit_s"],
        "commit_s_per_10M_keys": lambda o: _store_size(o)["commit_s"] * 1e7 / _store_size(o)["keys"],
        "commit_peak_bytes_per_key": lambda o: _store_size(o)["commit_peak_rss_bytes_per_key"],
        "commit_peak_anon_bytes_per_key": lambda o: _store_size(o)["commit_peak_anon_bytes_per_key"],
        "lookup_keys_per_s": lambda o: _store_size(o)["lookup_batched_keys_per_s"],
        "lookup_str_keys_per_s": lambda o: _store_size(o)["lookup_batched_str_keys_per_s"],
        "snapshot_bytes": lambda o: _store_size(o)["snapshot_bytes"],
    })
    section["sizes"] = dict(out.get("results", {}))
    section["own_goals"] = out.get("goals")
    return section


def map_bookkeeping(out: dict[str, Any]) -> dict[str, Any]:
    return out  # bench/bookkeeping.py already reports the fields


def map_workers(out: dict[str, Any]) -> dict[str, Any]:
    return out


def map_lossless(out: dict[str, Any]) -> dict[str, Any]:
    return out


MAPPERS = {"stage": map_stage, "store": map_store, "bookkeeping": map_bookkeeping,
           "workers": map_workers, "lossless": map_lossless}


# -- goals -----------------------------------------------------------------------------------

def _get(results: dict[str, Any], section: str, field: str) -> Any:
    value = results.get(section, {}).get(field)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def judge(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every goal of the issue with its measured value and verdict (None: not measured)."""
    goals: list[dict[str, Any]] = []

    def add(name: str, goal: str, measured: Any, ok: Callable[[Any], bool], note: str = "",
            unit: str = "") -> None:
        verdict = None if measured is None else bool(ok(measured))
        goals.append({"name": name, "goal": goal, "measured": measured, "unit": unit,
                      "pass": verdict, "note": note})

    g = lambda s, f: _get(results, s, f)  # noqa: E731
    add("stage overhead", "<= 1% (staged vs raw, before decode)", g("stage", "overhead"),
        lambda v: v <= 0.01, unit="fraction")
    add("stage alone", ">= 1M samples/s", g("stage", "stage_alone_samples_per_s"),
        lambda v: v >= 1e6, unit="samples/s")
    saved, pruned = g("stage", "decode_time_saved"), g("stage", "pruned_fraction")
    add("decode time saved", ">= 0.9 x the pruned fraction (pruning before decode)",
        None if saved is None or not pruned else saved / pruned, lambda v: v >= 0.9,
        "" if saved is None else f"{saved:.3f} of the decode pipeline's time saved, "
        f"{pruned:.3f} of its samples pruned", "share of pruned")
    keys = g("store", "keys")
    at = "" if keys is None else f"at {keys:,} keys"
    add("record (key strings)", ">= 2M keys/s", g("store", "record_keys_per_s"),
        lambda v: v >= 2e6, at, "keys/s")
    add("record (uint64 hashes)", ">= 2M keys/s", g("store", "record_u64_keys_per_s"),
        lambda v: v >= 2e6, at, "keys/s")
    small = keys is not None and keys < 10_000_000
    scaled = (f"commit_s x {10_000_000 / keys:g}: measured at {keys:,} keys, extrapolated "
              f"linearly" if small else at)
    add("commit time", "<= 5 s per 10M keys", g("store", "commit_s_per_10M_keys"),
        lambda v: v <= 5.0, scaled, "s")
    add("commit peak memory", "<= 32 B/key (peak RSS growth)", g("store", "commit_peak_bytes_per_key"),
        lambda v: v <= 32.0, at + ("; the goal is for 10M keys, where fixed costs weigh less "
                                   "per key" if small else ""), "B/key")
    add("bookkeeping vs official", "ours/reference <= 0.25 (key strings)",
        g("bookkeeping", "ratio"), lambda v: v <= 0.25,
        f"N = {results.get('bookkeeping', {}).get('n', '?'):,}" if g("bookkeeping", "n") else "",
        "ratio")
    add("bookkeeping vs official (hash keys)", "ours/reference <= 0.25 (__key_hash__ tensors)",
        g("bookkeeping", "ratio_hash"), lambda v: v <= 0.25, unit="ratio")
    add("bookkeeping vs official, commit overlapped",
        "ours/reference <= 0.25 (key strings; only time the training loop is blocked)",
        g("bookkeeping", "ratio_blocking"), lambda v: v <= 0.25,
        "" if g("bookkeeping", "eval_s") is None else
        f"end_epoch(wait=False) beside a simulated evaluation of {g('bookkeeping', 'eval_s'):g} s "
        "(not counted); update + end_epoch + waiting for the commit + plan", "ratio")
    add("bookkeeping vs official, its sampler included",
        "ours/(reference + its sampler) <= 0.25 (key strings)",
        g("bookkeeping", "ratio_with_sampler"), lambda v: v <= 0.25,
        "the official IBSampler's per-index __next__ runs in the training process too; "
        "reference_s leaves it out, as the issue defines it", "ratio")
    add("worker memory", "private growth per worker <= 5% of the snapshot",
        g("workers", "private_growth_fraction"), lambda v: v <= 0.05,
        "" if g("workers", "keys") is None else
        f"{results['workers']['workers']} workers, {results['workers']['keys']:,} keys", "fraction")
    lossless = results.get("lossless", {})
    full_mean, full_std = g("lossless", "full_acc_mean"), g("lossless", "full_acc_std")
    ib_mean, rnd_mean = g("lossless", "infobatch_acc_mean"), g("lossless", "random_acc_mean")
    gap = None if None in (full_mean, ib_mean) else ib_mean - full_mean
    add("lossless: InfoBatch vs full data", "accuracy >= full mean - one std of full",
        gap, lambda v: v >= -full_std,
        "" if full_std is None else f"measured = InfoBatch mean - full mean; one std = "
        f"{100 * full_std:.2f} points", "points")
    add("lossless: InfoBatch vs random pruning", "accuracy above random pruning (same budget)",
        None if None in (ib_mean, rnd_mean) else ib_mean - rnd_mean, lambda v: v > 0,
        "measured = InfoBatch mean - random mean", "points")
    saved, theory = g("lossless", "samples_saved"), g("lossless", "theory_saved")
    add("samples saved vs theory", "within 2 points of theory",
        None if None in (saved, theory) else saved - theory, lambda v: abs(v) <= 0.02,
        "" if theory is None else f"measured - theory; theory = {100 * theory:.2f}%", "points")
    add("samples saved", ">= 30%", saved, lambda v: v >= 0.30,
        "" if not lossless else f"{lossless.get('epochs')} epochs, {lossless.get('seeds')} seeds",
        "fraction")
    return goals


# -- the whole run -----------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    import numpy
    import pyarrow
    import torch
    import webdataset

    cpu = ""
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "pyarrow": pyarrow.__version__,
            "webdataset": webdataset.__version__, "load_average_at_start": os.getloadavg()}


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=ROOT, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "bench"],
                               capture_output=True, text=True, cwd=ROOT, timeout=10).stdout.strip()
        return done.stdout.strip() + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_all(quick: bool, only: list[str] | None = None,
            extra: dict[str, list[str]] | None = None) -> dict[str, Any]:
    started = datetime.datetime.now(datetime.timezone.utc)
    results: dict[str, Any] = {
        "meta": {"date": started.isoformat(timespec="seconds"), "quick": quick,
                 "command": "python bench/run.py" + (" --quick" if quick else ""),
                 "git_commit": git_commit(), "machine": machine(), "benchmarks": {}},
    }
    for name in only or ORDER:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        run = run_benchmark(name, quick, (extra or {}).get(name))
        results["meta"]["benchmarks"][name] = {k: run.get(k) for k in ("command", "seconds", "error")}
        if "output" in run:
            results[name] = MAPPERS[name](run["output"])
            if name in ("stage", "store"):
                results[name]["raw"] = run["output"]
        else:
            results[name] = {"error": run["error"], "stderr": run.get("stderr", "")}
        print(f"[bench] {name}: " + (f"{run['seconds']:.0f} s" if "output" in run else run["error"]),
              file=sys.stderr, flush=True)
    results["meta"]["machine"]["load_average_at_end"] = os.getloadavg()
    results["meta"]["seconds"] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    results["goals"] = judge(results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes: about 3-4 minutes")
    parser.add_argument("--out", default=os.path.join(BENCH, "results.json"))
    parser.add_argument("--docs", default=os.path.join(ROOT, "docs"),
                        help="where benchmarks.md, benchmarks.json and the plots go")
    parser.add_argument("--no-docs", action="store_true", help="write the JSON only")
    parser.add_argument("--only", nargs="+", choices=ORDER, help="run only these benchmarks")
    parser.add_argument("--report-only", metavar="PATH",
                        help="render the docs from this results file; run nothing")
    args = parser.parse_args(argv)

    if args.report_only:
        with open(args.report_only) as source:
            results = json.load(source)
        for name in ("stage", "store"):  # re-map what their raw output holds, then re-judge
            raw = results.get(name, {}).get("raw")
            if raw is not None:
                results[name] = dict(MAPPERS[name](raw), raw=raw)
        results["goals"] = judge(results)
    else:
        results = run_all(args.quick, args.only)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as sink:
            json.dump(results, sink, indent=1)
        print(f"[bench] wrote {args.out}", file=sys.stderr)
    if not args.no_docs:
        import report

        written = report.write_docs(results, args.docs)
        print(f"[bench] wrote {', '.join(written)}", file=sys.stderr)
    for goal in results["goals"]:
        verdict = {True: "pass", False: "MISS", None: "n/a "}[goal["pass"]]
        print(f"[bench] {verdict}  {goal['name']}: {goal['measured']!r:.12}  (goal {goal['goal']})",
              file=sys.stderr)
    errors = [n for n in ORDER if "error" in results.get(n, {})]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

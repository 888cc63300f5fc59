"""Smoke test of the benchmarks: the cheapest pieces at tiny sizes, in seconds.

Checks that each benchmark runs, that its JSON has the fields docs/benchmarks.md and the
goals need, and that the values are sane (counts add up, fractions are fractions). No
timing is asserted: this machine's timings are not the benchmarks' business here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    """A module of bench/ (not a package), imported under a name that cannot collide."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # run.py imports report.py by its plain name
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def bookkeeping_result():
    return load("bookkeeping").run(size=20_000, epochs=3, eval_s=0.2)


@pytest.fixture(scope="module")
def workers_result():
    return load("workers").run(keys=40_000, workers=2)


@pytest.fixture(scope="module")
def lossless_result():
    return load("lossless").run(seeds=2, epochs=3)


def test_official_prune_keeps_the_exact_count():
    bookkeeping = load("bookkeeping")
    ref = bookkeeping.OfficialBookkeeping(10_000, num_epochs=10)
    ref.scores = torch.from_numpy(np.random.default_rng(0).lognormal(size=10_000).astype(np.float32))
    below = int((ref.scores < ref.scores.mean()).sum())
    np.random.seed(0)
    kept = ref.prune()
    assert len(kept) == 10_000 - (below - int(0.5 * below))
    assert len(set(kept)) == len(kept)
    assert int((ref.weights == 2.0).sum()) == int(0.5 * below)


def test_bookkeeping_fields(bookkeeping_result):
    r = bookkeeping_result
    for variant in ("ours_str", "ours_hash", "ours_overlap", "reference"):
        assert positive(r[f"{variant}_s"])
        parts = r[f"{variant}_breakdown"]
        assert set(parts) >= {"update_s", "commit_s", "plan_s", "samples"}
        assert 0 < parts["samples"] <= r["n"]
    assert r["ours_s"] == r["ours_str_s"]
    assert r["ratio"] == pytest.approx(r["ours_str_s"] / r["reference_s"])
    assert positive(r["ratio_hash"]) and positive(r["reference_sampler_s"])
    # pruning epochs train fewer samples than the warm-up epoch, in every variant
    for variant in ("ours_str", "ours_hash", "reference"):
        epochs = r["epochs"][variant]
        assert epochs[0]["samples"] > epochs[1]["samples"]
    # ours trains what its plan said (to within the last, incomplete batch)
    for entry in r["epochs"]["ours_str"]:
        assert 0 <= entry["planned_samples"] - entry["samples"] < r["batch_size"]


def test_bookkeeping_blocking_fields(bookkeeping_result):
    r = bookkeeping_result
    assert r["eval_s"] == 0.2
    assert r["ratio_blocking"] == pytest.approx(r["ours_overlap_s"] / r["reference_s"])
    assert positive(r["overlap_commit_s"]) and positive(r["ratio_blocking_cpu"])
    assert set(r["ours_overlap_breakdown"]) >= {"update_s", "commit_s", "wait_s", "plan_s"}
    for entry in r["epochs"]["ours_overlap"]:
        # only blocked time: update + handing the commit over + what was left to wait + plan
        assert entry["total_s"] == pytest.approx(
            entry["update_s"] + entry["commit_s"] + entry["wait_s"] + entry["plan_s"])
        # the library's own count of the boundary's blocking time: handing over + waiting
        assert entry["library_blocking_s"] <= entry["commit_s"] + entry["wait_s"]
    # overlapping the commit changes no decision: the same samples as the blocking variant
    assert [e["samples"] for e in r["epochs"]["ours_overlap"]] == \
        [e["samples"] for e in r["epochs"]["ours_str"]]


def test_workers_fields(workers_result):
    r = workers_result
    assert r["workers"] == 2 and r["keys"] == 40_000
    assert r["samples"] == r["control_samples"] == 40_000   # every key read, in both passes
    assert 0.5 * 40_000 < r["kept"] < 40_000                # epoch 1 prunes some below the mean
    assert positive(r["snapshot_bytes"]) and r["snapshot_bytes"] >= 16 * 40_000
    for field in ("rss_growth_per_worker_bytes", "private_growth_per_worker_bytes",
                  "control_private_growth_per_worker_bytes", "snapshot_rss_per_worker_bytes",
                  "private_growth_fraction", "net_private_growth_fraction"):
        assert isinstance(r[field], (int, float)), field
    assert r["private_growth_fraction"] == pytest.approx(
        r["private_growth_per_worker_bytes"] / r["snapshot_bytes"])
    assert r["snapshot_rss_per_worker_bytes"] > 0           # the workers did map the snapshot
    assert len(r["per_worker"]) == 2


def test_lossless_fields(lossless_result):
    r = lossless_result
    for arm in ("full", "infobatch", "random"):
        assert 0 <= r[f"{arm}_acc_mean"] <= 1 and r[f"{arm}_acc_std"] >= 0
        assert len(r[f"{arm}_accs"]) == 2 and positive(r[f"{arm}_wall_s"])
        assert len(r[f"{arm}_curve_mean"]) == r["epochs"] == 3
    assert r["full_samples_saved"] == 0
    assert r["full_samples_per_epoch"] == [r["train_size"]] * 3
    # 3 epochs, delta 0.875: epoch 0 knows nothing, epoch 1 prunes, epoch 2 anneals
    assert r["annealing_start"] == 2
    ib = r["infobatch_samples_per_epoch"]
    assert ib[0] == ib[2] == r["train_size"] > ib[1]
    assert 0 < r["samples_saved"] < 0.5 and 0 < r["theory_saved"] < 0.5
    assert abs(r["samples_saved"] - r["theory_saved"]) < 0.05


def test_run_maps_fields_and_lists_missing_ones():
    run = load("run")
    stage = run.map_stage({"raw_samples_per_s": 100.0, "staged_samples_per_s": 99.0, "overhead": 0.01,
                           "stage_alone_samples_per_s": 2e6, "pruned_fraction": 0.3})
    assert stage["overhead"] == 0.01
    assert "decode_time_saved" in stage["missing"] and stage["decode_time_saved"] is None
    store = run.map_store({"results": {"1000000": {
        "keys": 1_000_000, "record_str_keys_per_s": 3e6, "record_u64_keys_per_s": 9e6,
        "commit_s": 0.4, "commit_peak_rss_bytes_per_key": 30.0,
        "commit_peak_anon_bytes_per_key": 20.0, "lookup_batched_keys_per_s": 7e6,
        "lookup_batched_str_keys_per_s": 5e6, "snapshot_bytes": 16_000_000}}})
    assert store["missing"] == []
    assert store["commit_s_per_10M_keys"] == pytest.approx(4.0)
    assert run.parse_json_output('progress\n{"a": 1}\n') == {"a": 1}


def test_goals_and_docs(tmp_path, bookkeeping_result, workers_result, lossless_result):
    run = load("run")
    results = {"meta": {"date": "today", "command": "python bench/run.py --quick", "quick": True,
                        "machine": {"cpus": 2}},
               "stage": {"error": "exit status 1", "stderr": "Traceback ..."},
               "store": run.map_store({"results": {"1000000": {"keys": 1_000_000,
                                                               "commit_s": 0.4}}}),
               "bookkeeping": bookkeeping_result, "workers": workers_result,
               "lossless": lossless_result}
    results["goals"] = run.judge(results)
    by_name = {g["name"]: g for g in results["goals"]}
    assert by_name["stage overhead"]["pass"] is None              # not measured: no verdict
    assert by_name["record (key strings)"]["pass"] is None
    assert by_name["commit time"]["measured"] == pytest.approx(4.0)
    assert by_name["commit time"]["pass"] is True
    assert by_name["bookkeeping vs official"]["measured"] == bookkeeping_result["ratio"]
    overlapped = by_name["bookkeeping vs official, commit overlapped"]
    assert overlapped["measured"] == bookkeeping_result["ratio_blocking"]
    assert overlapped["pass"] is (bookkeeping_result["ratio_blocking"] <= 0.25)
    assert by_name["samples saved"]["measured"] == lossless_result["samples_saved"]
    for goal in results["goals"]:
        assert goal["pass"] in (True, False, None) and goal["goal"]

    written = load("report").write_docs(results, str(tmp_path))
    page = (tmp_path / "benchmarks.md").read_text()
    assert "## Goals" in page and "This benchmark failed" in page
    assert f"`ratio_blocking` = **{bookkeeping_result['ratio_blocking']:.2f}** (goal <= 0.25)" in page
    assert "ours, strings, `end_epoch(wait=False)`" in page
    for name in ("lossless", "bookkeeping", "workers"):
        png = tmp_path / f"benchmarks-{name}.png"
        assert str(png) in written and png.stat().st_size > 1000
        assert png.name in page
    assert json.loads((tmp_path / "benchmarks.json").read_text())["goals"] == results["goals"]


def test_docs_explain_a_missed_stage_goal(tmp_path):
    """The findings of a stage run that misses its overhead and decode goals render (the
    decode figures live in the raw output: reading them from the mapped section crashed)."""
    run = load("run")
    side = {"overhead": 0.05, "overhead_quartiles": [0.02, 0.08], "overhead_wall": 0.05}
    raw = {"raw_samples_per_s": 9000.0, "staged_samples_per_s": 8550.0, "overhead": 0.05,
           "stage_alone_samples_per_s": 1.1e6, "decode_time_saved": 0.20, "pruned_fraction": 0.30,
           "overhead_from_stage_cost": 0.006, "clock": "process CPU time", "settings": {},
           "pipeline": {"pruning": side, "not_pruning": side,
                        "raw_again": {"overhead_quartiles": [-0.01, 0.02]},
                        "window_only": {"overhead": 0.027}},
           "decode": {"prunable_share": 0.92, "expected_saved_if_decode_is_skipped": 0.276}}
    results = {"meta": {"date": "today", "command": "python bench/run.py", "quick": False,
                        "machine": {"cpus": 2}},
               "stage": dict(run.map_stage(raw), raw=raw)}
    results["goals"] = run.judge(results)
    by_name = {g["name"]: g for g in results["goals"]}
    assert by_name["stage overhead"]["pass"] is False
    assert by_name["decode time saved"]["pass"] is False
    assert by_name["decode time saved"]["measured"] == pytest.approx(0.2 / 0.3)
    report = load("report")
    report.write_docs(results, str(tmp_path))
    page = (tmp_path / "benchmarks.md").read_text()
    assert "**Stage overhead** (5.00%" in page and "control costs 2.70%" in page
    assert "**Decode time saved** (20.0% against 30.0%" in page and "at most 27.6%" in page
    assert "Missed in this run: stage overhead; decode time saved." in page
    # what was found and tried is prose kept by hand in docs/, which the page links
    findings = report.FINDINGS_PAGE
    assert f"]({findings})" in page and (BENCH.parent / "docs" / findings).is_file()


def test_run_end_to_end_with_a_subprocess(tmp_path):
    """run.py runs a benchmark as a process, parses its JSON and writes both outputs."""
    run = load("run")
    results = run.run_all(quick=True, only=["bookkeeping"],
                          extra={"bookkeeping": ["--n", "5000", "--epochs", "2", "--eval-s", "0.1"]})
    assert "error" not in results["bookkeeping"], results["bookkeeping"]
    assert results["bookkeeping"]["n"] == 5000
    assert results["meta"]["benchmarks"]["bookkeeping"]["seconds"] > 0
    assert {g["name"] for g in results["goals"]} >= {"bookkeeping vs official", "worker memory"}

"""Smoke test of bench/diffusion.py at a tiny size: it runs, its JSON has the fields
docs/diffusion.md uses with sane values, and a second invocation reuses the cached runs."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "diffusion.py"
TINY = ["--train-images", "32", "--heldout-images", "8", "--epochs", "3", "--seeds", "2",
        "--batch-size", "8", "--channels", "8,16", "--eval-timesteps", "2"]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_diffusion", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module    # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_bench()


@pytest.fixture(scope="module")
def tiny(bench, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-diffusion")
    args = TINY + ["--workdir", str(root / "work"), "--out", str(root / "out.json"),
                   "--plot", str(root / "curves.png")]
    bench.main(args)
    return root, args, json.loads((root / "out.json").read_text())


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_every_arm_has_the_fields_the_docs_use(tiny):
    _, _, result = tiny
    assert set(result["arms"]) == {"full", "infobatch", "infobatch_timestep", "random", "full_short"}
    for name, arm in result["arms"].items():
        assert len(arm["final_heldout"]) == 2 and arm["seeds"] == [0, 1]
        assert all(0 < v < 2 for v in arm["final_heldout"]), name   # a noise-prediction MSE
        assert arm["mean"] == pytest.approx(sum(arm["final_heldout"]) / 2)
        for field in ("sd", "diff_vs_full", "diff_in_full_sd", "diff_se", "samples_saved",
                      "wall_saved", "cpu_saved"):
            assert finite(arm[field]), (name, field)
        assert all(w > 0 for w in arm["wall_s"])
        c = arm["curves"]
        assert len(c["heldout_mean"]) == len(c["samples_mean"]) == arm["epochs"]
        assert c["heldout_mean"][-1] == pytest.approx(arm["mean"])
        assert all(b > a for a, b in zip(c["samples_mean"], c["samples_mean"][1:], strict=False))


def test_the_arms_train_what_their_settings_say(tiny):
    _, _, result = tiny
    arms = result["arms"]
    full_epoch = 32                                    # 32 images, batch 8: no partial batch
    assert arms["full"]["samples_trained"] == [3 * full_epoch] * 2
    assert arms["full"]["samples_saved"] == 0 and arms["full"]["diff_vs_full"] == 0
    for name in ("infobatch", "random"):
        # 3 epochs, delta 0.875: epoch 0 knows nothing, epoch 1 prunes, epoch 2 anneals
        trained = [s[0] for s in arms[name]["curves"]["samples"]]
        assert trained == [full_epoch, full_epoch]
        assert 0 < arms[name]["samples_saved"] < 0.5
        assert arms[name]["curves"]["pruned_mean"][0] == arms[name]["curves"]["pruned_mean"][2] == 0
    # full data for fewer epochs, as many visits as InfoBatch trained (rounded to epochs)
    ib_trained = sum(arms["infobatch"]["samples_trained"]) / 2
    assert arms["full_short"]["epochs"] == max(1, round(ib_trained / full_epoch))
    assert arms["full_short"]["samples_trained"] == [arms["full_short"]["epochs"] * full_epoch] * 2


def test_plateau_and_verdict_are_computed_from_the_runs(tiny):
    _, _, result = tiny
    p = result["plateau"]
    full = result["arms"]["full"]
    assert p["window_epochs"] == [2, 2]
    gains = [h[1] - h[2] for h in full["curves"]["heldout"]]
    assert p["improvement_per_seed"] == pytest.approx(gains)
    assert p["full_sd"] == pytest.approx(full["sd"])
    assert p["met"] == (sum(gains) / 2 < full["sd"])
    v = result["verdict"]
    for name in ("infobatch", "infobatch_timestep", "random", "full_short"):
        arm = result["arms"][name]
        assert v[name]["lossless"] == (abs(arm["diff_vs_full"]) <= 2 * full["sd"]
                                       and arm["samples_saved"] >= 0.25)
    assert v["infobatch_vs_random"]["gap"] == pytest.approx(
        result["arms"]["infobatch"]["mean"] - result["arms"]["random"]["mean"])


def test_a_second_invocation_reuses_every_cached_run(bench, tiny, monkeypatch):
    root, args, first = tiny
    assert (root / "curves.png").read_bytes().startswith(b"\x89PNG")

    def must_not_train(*args, **kwargs):
        raise AssertionError("a cached (arm, seed) was trained again")

    monkeypatch.setattr(bench, "train_arm", must_not_train)
    again = bench.main(args)
    assert again["arms"] == first["arms"]


def test_the_docs_table_renders_every_arm_from_the_json(bench, tiny):
    import diffusion_summary  # next to bench/diffusion.py, which put it on sys.path

    _, _, result = tiny
    page = diffusion_summary.markdown(result)
    for name, arm in result["arms"].items():
        assert f"| {name} | {arm['epochs']} | {arm['mean']:.5f} ± {arm['sd']:.5f} |" in page
    assert ("**met**" in page) == result["plateau"]["met"]


def test_one_seed_is_summarized_without_an_sd(bench, tiny):
    """A single seed (a timing run) has no sd: differences in sd are None, not a crash."""
    import diffusion_summary

    root, _, result = tiny
    runs = {name: [json.loads(next((root / "work").glob(f"runs-*/{name}-seed0.json")).read_text())]
            for name in result["arms"]}
    one = diffusion_summary.summarize(result["regime"], runs)
    assert one["arms"]["full"]["sd"] == 0 and one["arms"]["infobatch"]["diff_in_full_sd"] is None
    assert one["verdict"]["infobatch_vs_random"]["gap_in_full_sd"] is None
    assert "| infobatch |" in diffusion_summary.markdown(one)

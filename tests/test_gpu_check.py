"""bench/gpu_check.py: without CUDA it skips cleanly; ``--cpu`` runs the same checks' code on
the CPU (gloo), so the script is known to run before it meets a GPU. No timing is asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def run(*args: str, env: dict | None = None) -> dict:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(done.stdout)


def test_without_cuda_it_prints_the_skip_and_exits_0():
    result = run(env={"CUDA_VISIBLE_DEVICES": ""})
    assert result["skipped"] == "no CUDA device"
    assert "torch" in result


def test_on_the_cpu_every_check_runs_and_reports(tmp_path):
    result = run("--cpu", "--quick", env={"INFOBATCH_STREAM_CACHE": str(tmp_path / "cache")})
    assert result["dry_run_on_cpu"] is True and result["device"] == "cpu"
    checks = result["checks"]
    assert set(checks) == {"distributed", "sync_free", "bf16", "throughput", "ffhq_example"}
    example = checks["ffhq_example"]
    for space in ("pixels", "latents"):   # 6 optimizer steps of 8 faces: epoch 0 committed
        assert example[space]["ok"] and example[space]["global_step"] == 6, example
        assert example[space]["epochs_committed"] == 1 and example[space]["pipeline_saved"]
    assert example["ok"]
    assert checks["distributed"] == {"ok": True, "backend": "gloo", "steps": 8}  # 512 / 64
    assert checks["sync_free"]["ok"] is None and "CUDA" in checks["sync_free"]["skipped"]
    bf16 = checks["bf16"]
    assert bf16["relative_error_if_weighted_in_bf16"] > 1e-4   # the check can tell
    assert bf16["ok"] == (bf16["dtype"] == "float32" and bf16["relative_error"] <= 1e-6)
    throughput = checks["throughput"]
    assert "error" not in throughput, throughput
    assert throughput["steps_per_epoch"] == 8 and throughput["rounds"] == 2
    for name in ("ratio", "steps_per_s_without", "steps_per_s_with", "loader_batches_per_s"):
        assert math.isfinite(throughput[name]) and throughput[name] > 0, name
    assert math.isclose(throughput["ratio"],
                        throughput["steps_per_s_with"] / throughput["steps_per_s_without"])

"""An error on one rank at the epoch boundary is raised on every rank: no rank hangs."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = str(Path(__file__).with_name("dist_errors.py"))


@pytest.mark.parametrize("where, failing_rank, message", [
    ("commit", 0, "disk full while committing epoch 0"),
    ("flush", 1, "network down while flushing"),
])
def test_failure_on_one_rank_is_raised_on_all(tmp_path, where, failing_rank, message):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         SCRIPT, where, str(tmp_path / "store")],
        capture_output=True, text=True, timeout=300)
    out = result.stdout
    assert result.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank} raised" in out, out + result.stderr[-2000:]
        assert message in out.split(f"rank {rank} raised", 1)[1].splitlines()[0]
    other = 1 - failing_rank
    assert f"failed on rank {failing_rank}" in out.split(f"rank {other} raised", 1)[1].splitlines()[0]

"""Helpers for the examples' tests: run their command lines as a user would, in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")
FFHQ = os.path.join(EXAMPLES, "ffhq_diffusion")
DIGITS = os.path.join(EXAMPLES, "classification")


def script(*parts: str) -> str:
    return os.path.join(EXAMPLES, *parts)


@pytest.fixture
def example_env(cache_dir) -> dict:
    """The environment of an example's process: one CPU thread, a private snapshot cache."""
    env = dict(os.environ, INFOBATCH_STREAM_CACHE=cache_dir, OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env.pop("AWS_ENDPOINT_URL", None)
    return env


@pytest.fixture
def s3_env(example_env, s3_server) -> dict:
    """As ``example_env``, reaching the S3 test server through the usual AWS variables."""
    return dict(example_env, **s3_server.env)


def run(args: list, env: dict, timeout: float = 120) -> str:
    """Run ``python ARGS``; return its output, or fail the test with that output."""
    result = subprocess.run([sys.executable, *map(str, args)], env=env, capture_output=True,
                            text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {result.returncode}:\n"
                    f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result.stdout

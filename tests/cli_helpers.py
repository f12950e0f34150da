"""Run ``vqlib-train`` in a fresh process (the DDP tests need their own process group)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_training_cli(args: list[str], cwd: Path, timeout_s: int = 240) -> subprocess.CompletedProcess:
    """``python -m vqlib.training.cli *args`` with one OpenMP thread per process. A hang fails the test
    after ``timeout_s`` instead of stalling the suite; a non-zero exit fails it with the stderr tail."""
    cmd = [sys.executable, "-m", "vqlib.training.cli", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"vqlib-train did not finish in {timeout_s} s (hang?): {e}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc

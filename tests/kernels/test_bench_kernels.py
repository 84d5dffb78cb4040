"""bench/kernels.py stays runnable: its CPU dry run (Triton interpreter, tiny shapes) goes
through every runner, the table and, with --targets, the per-target verdicts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("extra", [[], ["--targets"]], ids=["sweep", "targets"])
def test_kernel_benchmark_dry_run(extra):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "kernels.py"), "--dry-run", *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "JSON not written" in proc.stdout
    if extra:  # all four targets get a line; the dry run has no baselines to compare with
        assert proc.stdout.count("target d128") == 4

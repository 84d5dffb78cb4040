"""`make passkey`'s three stages through the real CLI, a few steps each: the copy warm-up, the
short-document passkey warm-started from it, and the 4096-token passkey split over 2 gloo ranks
with striped ring attention warm-started from that; every stage's final line names its metric."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAST = ["trainer.steps=2", "trainer.eval_samples=2", "trainer.progress=false", "trainer.num_threads=1"]


def _run(tmp_path: Path, run_id: str, args: list[str], ranks: int = 1) -> str:
    launch = ["-m", "lctrain.launch", f"--nproc-per-node={ranks}"] if ranks > 1 else []
    env = {**os.environ, "LCTRAIN_RUN_ID": run_id, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *launch, "-m", "lctrain.train", *args, *FAST], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_the_three_passkey_stages_chain_by_warm_starts(tmp_path):
    out = _run(tmp_path, "s1", ["experiment=cpu_passkey_1_copy", "trainer.micro_batch_size=2"])
    assert "long-range copy accuracy" in out and "(chance 1.6%)" in out
    out = _run(tmp_path, "s2", ["experiment=cpu_passkey_2_short", "trainer.micro_batch_size=2",
                                "trainer.init_from=outputs/s1"])
    assert "passkey digit accuracy" in out and (tmp_path / "outputs" / "s2" / "checkpoints").is_dir()
    out = _run(tmp_path, "s3", ["experiment=cpu_passkey_3_4k", "trainer.micro_batch_size=1",
                                "trainer.init_from=outputs/s2"], ranks=2)
    assert "passkey digit accuracy" in out and "(chance 10.0%)" in out

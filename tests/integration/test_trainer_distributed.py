"""The trainer on real gloo process groups: DP exactness, bit-exact resume, NaN guard.

One spawn of 2 ranks runs all multi-rank sub-cases, so start-up is paid once.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lctrain.checkpoint import latest_checkpoint
from lctrain.distributed import DistEnv
from lctrain.distributed.spawn import run_ranks
from tests.helpers.training import poisoned_step
from tests.helpers.training import run_steps as _run_steps
from tests.helpers.training import trainer as _trainer


def _workers(rank, world, tmp):
    out = {}
    # 1. float64 DP run: compared in the parent with one rank holding the whole global batch.
    t = _trainer(["trainer.dtype=float64", "trainer.steps=4"], f"{tmp}/f64")
    out["f64"] = _run_steps(t, 4)
    t.close()

    # 2. Uninterrupted float32 run with checkpoints every 3 steps.
    t = _trainer(["trainer.steps=6", "trainer.checkpoint_every=3"], f"{tmp}/full")
    out["full"] = [t.train_step() for _ in range(6)]
    t.close()

    # 3. Interrupted run: 3 steps, checkpoint, "crash"; a half-written later save is left behind.
    t = _trainer(["trainer.steps=6"], f"{tmp}/resumed")
    _run_steps(t, 3)
    t.save()
    t.close()
    if rank == 0:
        junk = Path(tmp, "resumed", "checkpoints", "step_00000005.partial")
        junk.mkdir(parents=True)
        (junk / "__0_0.distcp").write_bytes(b"truncated")
    torch.distributed.barrier()
    t = _trainer(["trainer.steps=6", "trainer.resume=auto"], f"{tmp}/resumed")
    out["resumed_from"] = t.step
    out["resumed"] = _run_steps(t, 3)
    t.close()

    # 4. NaN guard: a poisoned embedding row on rank 1 stops both ranks before the step.
    t = _trainer(["trainer.steps=2"], f"{tmp}/nan")
    out["nan"], out["nan_params_changed"] = poisoned_step(t, rank)
    t.close()
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp2")
    return tmp, run_ranks(_workers, 2, str(tmp))


def test_data_parallel_equals_one_rank_with_the_global_batch(two_ranks, tmp_path):
    _, results = two_ranks
    single = _trainer(["trainer.dtype=float64", "trainer.steps=4", "trainer.micro_batch_size=2"], tmp_path,
                      env=DistEnv(0, 1, 0, 1, torch.device("cpu"), None))
    expected = _run_steps(single, 4)
    for r in results:
        assert r["f64"] == pytest.approx(expected, abs=1e-10, rel=1e-10)
    assert results[0]["f64"][-1] < results[0]["f64"][0]


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(two_ranks):
    tmp, results = two_ranks
    for r in results:
        assert r["resumed_from"] == 3
        assert r["resumed"] == r["full"][3:], "resumed losses differ from the uninterrupted run"
    assert latest_checkpoint(Path(tmp, "resumed", "checkpoints")).name == "step_00000003"
    assert all(math.isfinite(x) for x in results[0]["full"])


def test_nan_guard_stops_every_rank_before_the_optimizer_step(two_ranks):
    _, results = two_ranks
    for r in results:
        assert "non-finite loss or gradient at step 1 on rank(s) [1]" in r["nan"]
        assert not r["nan_params_changed"]

"""Training with cp=disagg reproduces plain data-parallel training (float64, gloo).

W workers with disaggregated attention must give the losses and eval of one
process holding the whole global batch (W rows), which plain DP over W ranks
equals exactly (tests/integration/test_trainer_distributed.py). Sequences pack
several documents, so tasks, splits and the ping-pong document-boundary cut are
all exercised, in one spawn of 3 ranks: colocated with and without ping-pong,
dedicated on 3 ranks = 2 workers + 1 attention server (ping-pong). The same spawn
checks that dedicated mode resumes from a checkpoint (saved by the workers only)
bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lctrain.checkpoint import latest_checkpoint
from lctrain.distributed import DistEnv
from lctrain.distributed.spawn import run_ranks
from tests.helpers.training import rank as _rank
from tests.helpers.training import run_steps as _run_steps
from tests.helpers.training import trainer as _trainer

STEPS = 10
COMMON = ["trainer.dtype=float64", f"trainer.steps={STEPS}", "data.docs_per_seq=2"]
RUNS = {3: [("colocated", True), ("colocated", False), ("dedicated", True)]}


def _ranks(rank, world, tmp):
    out = {}
    for mode, ping_pong in RUNS[world]:
        key = (mode, ping_pong)
        t = _rank(COMMON + ["cp=disagg", f"disagg.mode={mode}", "disagg.num_servers=1",
                            f"disagg.ping_pong={str(ping_pong).lower()}", "disagg.timeout_s=60"],
                  f"{tmp}/{mode}-{ping_pong}")
        if not t.holds_model:
            out[key] = t.fit()
        else:
            out[key] = (_run_steps(t, STEPS), t.evaluate(), t.attention.counters.pairs, t.attention.step_metrics())
            t.attention.finish()
        t.close()
    out["resume"] = _dedicated_resume(tmp)
    return out


def _dedicated_resume(tmp):
    """float32 dedicated run: 6 steps straight, vs 3 steps + save + a fresh trainer resuming for 3 more."""
    def run(name, steps, extra=(), save=False):
        t = _rank(["cp=disagg", "disagg.mode=dedicated", "disagg.num_servers=1", "disagg.timeout_s=60",
                   "trainer.steps=6", "data.docs_per_seq=2", *extra], f"{tmp}/{name}")
        if not t.holds_model:
            assert t.save() is None and t.step == 0  # no state to save or restore
            result = t.fit()["final/served_calls"]
        else:
            result = (t.step, _run_steps(t, steps))
            if save:  # mid-run, while the server sits in its serve loop
                t.save()
            t.attention.finish()
        t.close()
        return result

    out = {"full": run("full", 6), "interrupted": run("interrupted", 3, save=True),
           "resumed": run("interrupted", 3, ["trainer.resume=auto"])}
    saved = latest_checkpoint(Path(tmp, "interrupted", "checkpoints"))
    out["saved"] = (saved.name, json.loads((saved / "meta.json").read_text())["world_size"])
    return out


@pytest.fixture(scope="module")
def disagg_runs(tmp_path_factory):
    return {world: run_ranks(_ranks, world, str(tmp_path_factory.mktemp(f"disagg{world}")), timeout=200)
            for world in RUNS}


def _plain_dp(workers, tmp):
    """Plain DP over `workers` ranks equals one process with micro_batch_size = workers."""
    t = _trainer(COMMON + [f"trainer.micro_batch_size={workers}"], tmp,
                 env=DistEnv(0, 1, 0, 1, torch.device("cpu"), None))
    return _run_steps(t, STEPS), t.evaluate()


@pytest.mark.parametrize("world,mode,ping_pong", [(3, "colocated", True), (3, "colocated", False),
                                                  (3, "dedicated", True)])
def test_disagg_training_reproduces_data_parallel(disagg_runs, tmp_path, world, mode, ping_pong):
    workers = world - 1 if mode == "dedicated" else world
    expected_losses, expected_eval = _plain_dp(workers, tmp_path)
    results = [r[(mode, ping_pong)] for r in disagg_runs[world]]
    for losses, evaluation, pairs, plan in results[:workers]:
        assert losses == pytest.approx(expected_losses, abs=1e-10, rel=1e-10)
        # The predicted balance is logged every step; it never exceeds what no servers would give.
        assert 1.0 <= plan["disagg/plan_imbalance"] <= plan["disagg/colocated_imbalance"] + 1e-9
        for key, value in expected_eval.items():
            assert evaluation[key] == pytest.approx(value, abs=1e-10), key
        assert (pairs == 0) == (mode == "dedicated")  # dedicated workers compute no attention
    if mode == "dedicated":
        assert results[-1]["final/served_calls"] > 0


@pytest.mark.parametrize("overrides,world,message", [
    (["disagg.mode=dedicated", "disagg.num_servers=3"], 3, "1 <= disagg.num_servers < world size"),
    (["cp.size=2"], 2, "cp=disagg keeps cp.size=1"),
    (["disagg.mode=remote"], 2, "disagg.mode"),
    (["disagg.mode=dedicated", "trainer.dp=3"], 3, "trainer.dp=-1"),
])
def test_disagg_config_mistakes_name_the_fix(overrides, world, message):
    from lctrain.config import compose_config, validate

    with pytest.raises(ValueError, match=message):
        validate(compose_config(["cp=disagg", *overrides]), world)
    assert validate(compose_config(["cp=disagg", "disagg.mode=dedicated", "trainer.checkpoint_every=5",
                                    "trainer.resume=auto"]), 3) == 2


def test_dedicated_resume_reproduces_the_uninterrupted_run_bit_for_bit(disagg_runs):
    """Workers save and load over their own group; the server follows no checkpoint collective."""
    results = [r["resume"] for r in disagg_runs[3]]
    for full, interrupted, resumed in ((r["full"], r["interrupted"], r["resumed"]) for r in results[:2]):
        assert full[0] == interrupted[0] == 0 and resumed[0] == 3
        assert interrupted[1] == full[1][:3]
        assert resumed[1] == full[1][3:], "resumed losses differ from the uninterrupted run"
    assert all(r["full"] > 0 and r["resumed"] > 0 for r in results[2:])
    assert all(r["saved"] == ("step_00000003", 2) for r in results)  # a checkpoint of the 2 workers

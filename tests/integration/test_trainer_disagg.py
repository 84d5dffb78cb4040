"""Training with cp=disagg reproduces plain data-parallel training (float64, gloo).

W workers with disaggregated attention must give the losses and eval of one
process holding the whole global batch (W rows), which plain DP over W ranks
equals exactly (tests/integration/test_trainer_distributed.py). Sequences pack
several documents, so tasks, splits and the ping-pong document-boundary cut are
all exercised, in one spawn of 3 ranks: colocated with and without ping-pong,
dedicated on 3 ranks = 2 workers + 1 attention server (ping-pong).
"""

from __future__ import annotations

import pytest
import torch

from lctrain.distributed import DistEnv
from tests.dist_utils import run_ranks
from tests.integration.test_trainer_distributed import _run_steps, _trainer

STEPS = 10
COMMON = ["trainer.dtype=float64", f"trainer.steps={STEPS}", "data.docs_per_seq=2"]
RUNS = {3: [("colocated", True), ("colocated", False), ("dedicated", True)]}


def _ranks(rank, world, tmp):
    out = {}
    for mode, ping_pong in RUNS[world]:
        key = (mode, ping_pong)
        t = _trainer(COMMON + ["cp=disagg", f"disagg.mode={mode}", "disagg.num_servers=1",
                               f"disagg.ping_pong={str(ping_pong).lower()}", "disagg.timeout_s=60"],
                     f"{tmp}/{mode}-{ping_pong}")
        if t.is_attention_server:
            out[key] = t.fit()
        else:
            out[key] = (_run_steps(t, STEPS), t.evaluate(), t.disagg.counters.pairs)
            t.stop_attention_servers()
        t.close()
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
    for losses, evaluation, pairs in results[:workers]:
        assert losses == pytest.approx(expected_losses, abs=1e-10, rel=1e-10)
        for key, value in expected_eval.items():
            assert evaluation[key] == pytest.approx(value, abs=1e-10), key
        assert (pairs == 0) == (mode == "dedicated")  # dedicated workers compute no attention
    if mode == "dedicated":
        assert results[-1]["final/served_calls"] > 0


@pytest.mark.parametrize("overrides,world,message", [
    (["disagg.mode=dedicated", "disagg.num_servers=3"], 3, "1 <= disagg.num_servers < world size"),
    (["cp.size=2"], 2, "cp=disagg keeps cp.size=1"),
    (["disagg.mode=remote"], 2, "disagg.mode"),
    (["disagg.mode=dedicated", "trainer.checkpoint_every=5"], 3, "cannot checkpoint yet"),
    (["disagg.mode=dedicated", "trainer.dp=3"], 3, "trainer.dp=-1"),
])
def test_disagg_config_mistakes_name_the_fix(overrides, world, message):
    from lctrain.config import compose_config, validate

    with pytest.raises(ValueError, match=message):
        validate(compose_config(["cp=disagg", *overrides]), world)
    assert validate(compose_config(["cp=disagg", "disagg.mode=dedicated"]), 3) == 2

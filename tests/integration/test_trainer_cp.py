"""Training with context parallelism reproduces cp=none (float64, 2 and 4 gloo ranks).

dp=1 x cp=P: the ranks hold parts of the same sequence, so the loss curve
must equal a single process holding whole sequences, over 10 steps and an
eval. seq_len=250 is not a multiple of P (nor of zigzag's 2P), so the
trainer's padding is exercised too. usp runs Ulysses over P/2 consecutive
ranks and the ring across them (P=4: 2 x 2).
"""

from __future__ import annotations


import pytest
import torch

from lctrain.distributed import DistEnv
from tests.dist_utils import run_ranks
from tests.integration.test_trainer_distributed import _run_steps, _trainer

CASES = [("ring", "contiguous"), ("ring", "striped"), ("ring", "zigzag"), ("allgather", "zigzag"),
         ("ulysses", "striped"), ("usp", "striped"), ("tree", "zigzag")]
STEPS = 10
COMMON = ["trainer.dtype=float64", f"trainer.steps={STEPS}", "data.seq_len=250", "trainer.decode_eval_samples=2"]
# The eval also decodes passkey answers with the KV cache sharded over the cp ranks
# (usp prefill is not supported by the decoder).
DECODE = {case: "tree" for case in CASES} | {("ring", "zigzag"): "ring", ("usp", "striped"): "none"}


def _workers(rank, world, tmp):
    out = {}
    for strategy, layout in CASES:
        t = _trainer(COMMON + [f"cp.strategy={strategy}", f"cp.layout={layout}", f"cp.size={world}",
                               f"cp.ulysses_size={max(1, world // 2)}", f"trainer.decode_eval={DECODE[strategy, layout]}"],
                     f"{tmp}/{strategy}-{layout}")
        out[(strategy, layout)] = (_run_steps(t, STEPS), t.evaluate())
        core = t.model.layers[0].attn.core
        assert core.strategy == strategy and core.layout.name == layout
        assert core.counters.pairs > 0 and core.counters.messages_sent > 0
        t.close()
    return out


@pytest.fixture(scope="module")
def cp_runs(tmp_path_factory):
    return {world: run_ranks(_workers, world, str(tmp_path_factory.mktemp(f"cp{world}"))) for world in (2, 4)}


@pytest.fixture(scope="module")
def no_cp(tmp_path_factory):
    t = _trainer(COMMON + ["trainer.decode_eval=tree"], tmp_path_factory.mktemp("nocp"),
                 env=DistEnv(0, 1, 0, 1, torch.device("cpu"), None))
    return _run_steps(t, STEPS), t.evaluate()


@pytest.mark.parametrize("world", (2, 4))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_cp_training_reproduces_cp_none(cp_runs, no_cp, case, world):
    expected_losses, expected_eval = no_cp
    for losses, evaluation in (r[case] for r in cp_runs[world]):
        assert losses == pytest.approx(expected_losses, abs=1e-10, rel=1e-10)
        assert ("eval/decode_exact" in evaluation) == (DECODE[case] != "none")
        for key, value in expected_eval.items():
            if key in evaluation or not key.startswith("eval/decode"):
                assert evaluation[key] == pytest.approx(value, abs=1e-10), key

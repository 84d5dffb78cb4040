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
from lctrain.distributed.spawn import run_ranks
from tests.helpers.training import run_steps as _run_steps
from tests.helpers.training import trainer as _trainer

CASES = [("ring", "contiguous"), ("ring", "striped"), ("ring", "zigzag"), ("allgather", "zigzag"),
         ("ulysses", "striped"), ("usp", "striped"), ("tree", "zigzag")]
STEPS = 10
COMMON = ["trainer.dtype=float64", f"trainer.steps={STEPS}", "data.seq_len=250", "trainer.decode_eval_samples=2",
          "cp.count=true"]
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
        core = t.model.core_attention
        assert core.strategy == strategy and core.layout.name == layout
        assert core.counters.pairs > 0 and core.counters.messages_sent > 0
        t.close()
    return out


WINDOW = ["model.window=48", "data.docs_per_seq=2"]


def _windowed(tmp, world=None):
    """Sliding-window training: cp=striped over the world, or cp=none in this process."""
    cp = ["cp=striped", f"cp.size={world}"] if world else []
    env = None if world else DistEnv(0, 1, 0, 1, torch.device("cpu"), None)
    t = _trainer(COMMON + WINDOW + cp + ["trainer.steps=4"], tmp, env=env)
    return _run_steps(t, 4)


def _windowed_workers(rank, world, tmp):
    return _windowed(f"{tmp}/window", world)


def test_sliding_window_trains_the_same_with_striped_cp(tmp_path):
    """model.window reaches every layer through the strategy: cp=striped at P=2 equals cp=none,
    and the window changes the losses (it is not ignored)."""
    expected = _windowed(tmp_path / "none")
    for losses in run_ranks(_windowed_workers, 2, str(tmp_path)):
        assert losses == pytest.approx(expected, abs=1e-10, rel=1e-10)
    t = _trainer(COMMON + ["data.docs_per_seq=2", "trainer.steps=4"], tmp_path / "full",
                 env=DistEnv(0, 1, 0, 1, torch.device("cpu"), None))
    assert _run_steps(t, 4) != pytest.approx(expected, abs=1e-6)


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

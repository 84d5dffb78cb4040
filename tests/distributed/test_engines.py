"""Engines on real gloo groups: engine=fsdp2 (sharded) reproduces engine=ddp (replicated) and the
single-process trainer under every cp strategy, with accumulation and active clipping; resume is
bit-exact; a checkpoint moves between engines and from dp 2 x cp 1 to dp 1 x cp 2.

One spawn of 2 ranks runs every sub-case, so start-up is paid once.
"""

from __future__ import annotations

import pytest
import torch

from lctrain.distributed import DistEnv
from lctrain.distributed.spawn import run_ranks
from tests.helpers.training import run_with_norms, trainer

STEPS = 3
EXACT = ["trainer.dtype=float64", "trainer.grad_accum=2", "optim.grad_clip=0.05", f"trainer.steps={STEPS}"]
CP = {"none": ["cp=none"], "striped ring": ["cp=striped", "cp.size=2"], "ulysses": ["cp=ulysses", "cp.size=2"],
      "tree": ["cp=tree", "cp.size=2"],
      # attention servers on both ranks; fsdp2 needs the blocks whole (no ping-pong halves)
      "disagg": ["cp=disagg", "disagg.ping_pong=false"]}


def _run(overrides, run_dir, steps=STEPS):
    return run_with_norms(overrides, run_dir, steps)


def _full_state(t) -> dict[str, torch.Tensor]:
    """Every model and optimizer tensor, whole (sharded ones gathered), by name."""
    def whole(x):
        return x.full_tensor() if hasattr(x, "full_tensor") else x

    out = {f"model.{k}": whole(v).clone() for k, v in t.model.state_dict().items()}
    for name, p in t.model.named_parameters():
        for key, value in t.optimizer.state[p].items():
            out[f"optim.{name}.{key}"] = whole(value).clone()
    return out


def _workers(rank, world, tmp):
    out = {}
    for case, cp in CP.items():
        for engine in ("ddp", "fsdp2"):
            t, losses, norms = _run([f"engine={engine}", *cp, *EXACT], f"{tmp}/{case}-{engine}")
            out[case, engine] = (losses, norms, t.engine.state_bytes(t.optimizer))
            t.close()

    # Resume: 2 steps, save, a fresh trainer resumes and takes step 3; vs the uninterrupted run above.
    for engine in ("ddp", "fsdp2"):
        t, _, _ = _run([f"engine={engine}", *CP["striped ring"], *EXACT], f"{tmp}/resume-{engine}", steps=2)
        t.save()
        t.close()
        t, losses, _ = _run([f"engine={engine}", *CP["striped ring"], *EXACT], f"{tmp}/resume-{engine}", steps=1)
        out["resumed", engine] = (t.step, losses)
        t.close()

    # Reshard: saved by fsdp2 at dp 2 x cp 1, resumed by ddp at dp 1 x cp 2 (same global batch).
    t, _, _ = _run(["engine=fsdp2", "cp=none", "trainer.steps=4"], f"{tmp}/reshard", steps=2)
    t.save()
    saved = _full_state(t)
    t.close()
    t = trainer(["engine=ddp", "cp=striped", "cp.size=2", "trainer.micro_batch_size=2", "trainer.steps=4",
                 "trainer.resume_allow_changes=[trainer.micro_batch_size]"], f"{tmp}/reshard")
    loaded = _full_state(t)
    out["reshard"] = (t.step, sorted(saved) == sorted(loaded),
                      max(float((saved[k] - loaded[k]).abs().max()) for k in saved))
    t.close()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(_workers, 2, str(tmp_path_factory.mktemp("engines")), timeout=600)


@pytest.mark.parametrize("case", list(CP))
def test_fsdp2_reproduces_ddp_and_the_single_process_trainer(results, case, tmp_path):
    ddp_losses, ddp_norms, ddp_bytes = results[0][case, "ddp"]
    for r in results:
        fsdp_losses, fsdp_norms, _ = r[case, "fsdp2"]
        assert fsdp_losses == pytest.approx(ddp_losses, rel=1e-12, abs=1e-12)
        assert fsdp_norms == pytest.approx(ddp_norms, rel=1e-12)  # norms too: clipping could hide a factor
        assert r[case, "ddp"][:2] == (ddp_losses, ddp_norms)  # every rank reports the same global figures
    assert min(ddp_norms) > 0.05  # clipping was active
    # One process holding the whole global batch (dp) or the whole sequence (cp).
    single = ["cp=none", "trainer.micro_batch_size=2"] if case in ("none", "disagg") else ["cp=none"]
    t = trainer(["engine=ddp", *single, *EXACT], tmp_path, env=DistEnv(0, 1, 0, 1, torch.device("cpu"), None))
    losses = [t.train_step() for _ in range(STEPS)]
    assert ddp_losses == pytest.approx(losses, rel=1e-10, abs=1e-10)
    # Sharding halves what each rank holds (within one block's rounding).
    fsdp_bytes = [r[case, "fsdp2"][2] for r in results]
    assert sum(b["params"] for b in fsdp_bytes) == ddp_bytes["params"]
    # AdamW's moments are sharded; its per-parameter step counters are kept whole on every rank.
    assert sum(b["optimizer"] for b in fsdp_bytes) == pytest.approx(ddp_bytes["optimizer"], rel=1e-3)
    for key in ("params", "optimizer"):
        assert max(b[key] for b in fsdp_bytes) < 0.55 * ddp_bytes[key]


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_resume_is_bit_exact(results, engine):
    for r in results:
        step, losses = r["resumed", engine]
        assert step == STEPS and losses == r["striped ring", engine][0][STEPS - 1:]


def test_a_fsdp2_checkpoint_at_dp2_resumes_under_ddp_at_cp2_with_equal_tensors(results):
    for r in results:
        step, same_names, max_diff = r["reshard"]
        assert step == 2 and same_names and max_diff == 0.0

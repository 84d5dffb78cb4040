"""engine=deepspeed (ZeRO stage 1, 2, 3) on real gloo groups: it reproduces engine=ddp's losses and
gradient norms under every cp strategy at dp 1 x cp 2 and dp 2 x cp 2, with accumulation and
active clipping, in fp32; resume is bit-exact; its checkpoints load with weights_only=True only,
carry the consolidated weights other engines warm start from, and refuse what they cannot resume.

Two spawns (2 and 4 ranks) run every sub-case, so start-up is paid twice.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lctrain.checkpoint import load_model_weights
from lctrain.checkpoint.files import META, read_meta, sha256_file, write_json_atomic
from lctrain.distributed.spawn import run_ranks
from lctrain.engines.deepspeed import zero_state_bytes
from tests.helpers.training import poisoned_step, run_with_norms, trainer

if not os.environ.get("CI"):  # CI installs the extra: a missing deepspeed fails there
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")

STEPS = 3
EXACT = ["trainer.dtype=float32", "trainer.grad_accum=2", "optim.grad_clip=0.05", f"trainer.steps={STEPS}"]
CP = {"none": ["cp=none"], "striped ring": ["cp=striped"], "ulysses": ["cp=ulysses"], "tree": ["cp=tree"]}
ENGINES = {"ddp": ["engine=ddp"], **{f"zero{s}": ["engine=deepspeed", f"engine.zero_stage={s}"] for s in (1, 2, 3)}}


def _run(overrides, run_dir, steps=STEPS):
    return run_with_norms(overrides, run_dir, steps)


def _cases(rank, world, tmp, cps):
    cp_size = 1 if world == 2 else 2
    out = {}
    for case in cps:
        size = [f"cp.size={2 if case != 'none' and world == 2 else (1 if case == 'none' else cp_size)}"]
        for engine, over in ENGINES.items():
            t, losses, norms = _run([*over, *CP[case], *size, *EXACT], f"{tmp}/{case}-{engine}")
            out[case, engine] = (losses, norms, t.engine.measured)
            t.close()
    return out


def _two_ranks(rank, world, tmp):
    out = _cases(rank, world, tmp, CP)
    ring = [*CP["striped ring"], "cp.size=2", *EXACT]
    # The tiled MLP (a tile count that does not divide the shard) under the sharding engines.
    for engine in ("fsdp2", "zero3"):
        over = ["engine=fsdp2"] if engine == "fsdp2" else ENGINES[engine]
        t, losses, norms = _run([*over, *ring, "model.mlp_tile_tokens=48"], f"{tmp}/tiled-{engine}")
        out["tiled", engine] = (losses, norms)
        t.close()
    for stage in (1, 2, 3):
        over = [*ENGINES[f"zero{stage}"], *ring]
        t, _, _ = _run(over, f"{tmp}/resume{stage}", steps=2)
        path = t.save()
        whole = t.engine.full_state_dict(rank)  # rank 0: the weights, gathered
        t.close()
        t, losses, _ = _run(over, f"{tmp}/resume{stage}", steps=1)
        out["resumed", stage] = (t.step, losses)
        t.close()
        if rank == 0:  # the consolidated weights are the model's, read by plain DCP
            fresh = _bare_model()
            load_model_weights(path, fresh)
            out["consolidated", stage] = max(float((fresh.state_dict()[k] - v).abs().max())
                                             for k, v in whole.items())
        # Other engines warm start from its weights; resuming it with anything else is refused.
        t = trainer(["engine=ddp", *ring, f"trainer.init_from={path}", "trainer.checkpoint_dir=" + f"{tmp}/warm{stage}"],
                    f"{tmp}/warm{stage}")
        out["warm", stage] = t.evaluate()["eval/loss"]
        t.close()
        out["refused", stage] = []
        for other in (["engine=ddp"], ["engine=deepspeed", f"engine.zero_stage={stage % 3 + 1}"]):
            try:
                trainer([*other, *ring, f"trainer.resume={path}"], f"{tmp}/refused{stage}")
                out["refused", stage].append("resumed")
            except ValueError as err:
                out["refused", stage].append(str(err))
    # A crafted DeepSpeed file (its digest rewritten too) is refused before anything runs from it.
    over = [*ENGINES["zero2"], *ring]
    t, _, _ = _run(over, f"{tmp}/crafted", steps=1)
    path = t.save()
    t.close()
    if rank == 0:
        victim = next((path / "deepspeed" / "state").glob("*model_states.pt"))
        torch.save({"module": _Exploit()}, victim)
        meta = read_meta(path)
        meta["files"][str(victim.relative_to(path))] = sha256_file(victim)
        write_json_atomic(path / META, meta)
    torch.distributed.barrier()
    try:
        trainer([*over, f"trainer.resume={path}"], f"{tmp}/crafted")
        out["crafted"] = "loaded"
    except ValueError as err:
        out["crafted"] = str(err)
    out["exploit_ran"] = Path(tmp, "pwned").exists()
    # NaN guard: a poisoned weight on rank 1 stops both ranks; no update is applied.
    t = trainer([*ENGINES["zero2"], *ring], f"{tmp}/nan")
    out["nan"], out["nan_params_changed"] = poisoned_step(t, rank)
    t.close()
    return out


class _Exploit:
    def __reduce__(self):
        return os.system, (f"touch {os.environ.get('LCTRAIN_TEST_TMP', '/nonexistent')}/pwned",)


def _bare_model():
    """The test model on one process, outside any process group."""
    from lctrain.attention.strategies.base import LocalAttention
    from lctrain.build import build_model
    from lctrain.config import compose_config
    from tests.helpers.training import BASE

    return build_model(compose_config(BASE).model, LocalAttention("torch"))


def _four_ranks(rank, world, tmp):
    return _cases(rank, world, tmp, ["striped ring", "ulysses", "tree"])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deepspeed")
    os.environ["LCTRAIN_TEST_TMP"] = str(tmp)
    return {2: run_ranks(_two_ranks, 2, str(tmp / "two"), timeout=420),
            4: run_ranks(_four_ranks, 4, str(tmp / "four"), timeout=420)}


@pytest.mark.parametrize("world,case", [(2, c) for c in CP] + [(4, c) for c in ("striped ring", "ulysses", "tree")])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_reproduces_ddp_losses_and_grad_norms(results, world, case, stage):
    ddp_losses, ddp_norms, _ = results[world][0][case, "ddp"]
    assert min(ddp_norms) > 0.05  # clipping was active
    for r in results[world]:
        losses, norms, _ = r[case, f"zero{stage}"]
        assert losses == pytest.approx(ddp_losses, rel=1e-6, abs=1e-6)
        assert norms == pytest.approx(ddp_norms, rel=1e-6)  # norms too: clipping could hide a factor


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_tiled_mlp_under_sharding_engines_reproduces_untiled_ddp(results, engine):
    ddp_losses, ddp_norms, _ = results[2][0]["striped ring", "ddp"]
    for r in results[2]:
        losses, norms = r["tiled", engine]
        assert losses == pytest.approx(ddp_losses, rel=1e-6, abs=1e-6)
        assert norms == pytest.approx(ddp_norms, rel=1e-6)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_state_is_what_deepspeed_partitioning_predicts(results, stage):
    numels = [p.numel() for p in _bare_model().parameters()]
    for world in (2, 4):
        measured = [r["striped ring", f"zero{stage}"][2] for r in results[world]]
        expected = zero_state_bytes(numels, world, stage)
        if stage == 1:  # measured at the step, after the boundary reduction freed the whole gradients
            expected["grads"] -= 4 * sum(numels)
        assert all(m == expected for m in measured), (measured, expected)
        ddp = results[world][0]["striped ring", "ddp"][2]
        assert expected["optimizer"] < ddp["optimizer"] / world + 8  # AdamW state is sharded in every stage


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_is_bit_exact(results, stage):
    for r in results[2]:
        step, losses = r["resumed", stage]
        assert step == STEPS and losses == r["striped ring", f"zero{stage}"][0][2:]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_checkpoint_carries_consolidated_weights_and_refuses_other_resumes(results, stage):
    r0 = results[2][0]
    assert r0["consolidated", stage] == 0.0
    assert all(r["warm", stage] == r0["warm", stage] for r in results[2])
    ddp_refusal, stage_refusal = r0["refused", stage]
    assert "was written by engine=deepspeed" in ddp_refusal and "trainer.init_from=" in ddp_refusal
    assert f"ZeRO-{stage} partitions of 2 ranks" in stage_refusal


def test_a_crafted_deepspeed_file_is_refused_without_running_it(results):
    for r in results[2]:
        assert "refusing to unpickle" in r["crafted"]
        assert not r["exploit_ran"]


def test_nan_guard_stops_every_rank_without_an_update(results):
    for r in results[2]:
        assert "non-finite loss or gradient at step 1 on rank(s) [1]" in r["nan"]
        assert not r["nan_params_changed"]

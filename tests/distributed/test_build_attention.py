"""build_attention(strategy=ring|allgather) end to end on 2 gloo ranks: default
positions come from the layout, counters accumulate, results match the reference."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lctrain.attention import Coords, build_attention, get_layout, reference_attention
from lctrain.distributed.spawn import run_ranks

STRATEGIES = ("ring", "allgather", "ulysses")
LAYOUTS = ("contiguous", "zigzag", "striped")


def _full_inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 32, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 32, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, 32, 2, 8, generator=g, dtype=torch.float64)
    dout = torch.randn(1, 32, 4, 8, generator=g, dtype=torch.float64)
    doc = torch.repeat_interleave(torch.tensor([0, 1, 2]), torch.tensor([5, 19, 8]))
    return q, k, v, dout, doc


def _worker(rank, world):
    dist.init_process_group("gloo")
    q, k, v, dout, doc = _full_inputs()
    results = {}
    for strategy in STRATEGIES:
        for name in LAYOUTS:
            layout = get_layout(name, world)
            attn = build_attention(strategy=strategy, layout=layout, group=None, kernel="torch", count=True)
            ql, kl, vl = (layout.shard(x, rank, dim=1).clone().requires_grad_() for x in (q, k, v))
            coords = Coords(layout.positions(32, rank), layout.shard(doc, rank, dim=0))
            out, lse = attn(ql, kl, vl, coords, return_lse=True)
            out.backward(layout.shard(dout, rank, dim=1))
            results[(strategy, name)] = {
                "out": out.detach().numpy(), "lse": lse.numpy(), "dq": ql.grad.numpy(),
                "dk": kl.grad.numpy(), "dv": vl.grad.numpy(), "pairs": attn.counters.pairs,
            }
    # A rank holding a shard of another length fails with the metadata check, not a hang.
    bad = 8 if rank == 1 else 16
    x = torch.randn(1, bad, 4, 8, dtype=torch.float64)
    try:
        build_attention(strategy="ring", layout=get_layout("contiguous", world))(x, x, x)
        results["mismatch"] = "no error"
    except ValueError as err:
        results["mismatch"] = str(err)
    results["shape_checks"] = _shape_checks_per_step(world)
    return results


def _shape_checks_per_step(world):
    """All-gathers a ring call issues (ring itself sends P2P only: these are the shape checks)."""
    calls = []
    original = dist.all_gather
    dist.all_gather = lambda *args, **kwargs: (calls.append(1), original(*args, **kwargs))[1]
    try:
        attn = build_attention(strategy="ring", layout=get_layout("striped", world))
        x = torch.randn(1, 8, 4, 8, dtype=torch.float64)
        counts = []
        for begin_step in (False, False, True, False):
            if begin_step:
                attn.begin_step()
            attn(x, x, x)
            counts.append(len(calls))
    finally:
        dist.all_gather = original
    return counts


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(_worker, 2)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_build_attention_matches_reference(two_ranks, strategy, layout_name):
    q, k, v, dout, doc = _full_inputs()
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = reference_attention(q, k, v, causal=True, doc_ids=doc)
    ref_out.backward(dout)
    layout = get_layout(layout_name, 2)
    per_rank = [r[(strategy, layout_name)] for r in two_ranks]
    got = {key: layout.unshard([torch.from_numpy(r[key]) for r in per_rank], dim=1 if key != "lse" else 2)
           for key in ("out", "lse", "dq", "dk", "dv")}
    expected = {"out": ref_out, "lse": ref_lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value.detach(), atol=1e-10, rtol=1e-10, msg=key)
    # forward + backward each count every unmasked pair once across the ranks
    causal = torch.arange(32)[None, :] <= torch.arange(32)[:, None]
    visible = int(((doc[:, None] == doc[None, :]) & causal).sum())
    assert sum(r["pairs"] for r in per_rank) == 2 * visible


def test_shards_of_different_shapes_fail_naming_the_rank(two_ranks):
    for r in two_ranks:
        assert "group rank(s) [1] differ" in r["mismatch"]


def test_shape_check_runs_once_per_step_not_per_call(two_ranks):
    # first call checks, later calls of the step do not, begin_step() re-arms it
    for r in two_ranks:
        assert r["shape_checks"] == [1, 1, 2, 2]


def test_layout_group_size_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="cp_size=1"):
        build_attention(strategy="ring", layout=get_layout("striped", 4))


def _mismatch_worker(rank, world):
    """Three ranks: one with a shard of another length, then one with another dtype."""
    dist.init_process_group("gloo")
    layout = get_layout("striped", world)
    messages = []
    for bad_rank, seq, dtype in ((2, 4, torch.float64), (1, 8, torch.float32)):
        length = seq if rank == bad_rank else 8
        x = torch.randn(1, length, 4, 8, dtype=dtype if rank == bad_rank else torch.float64)
        for strategy in ("ring", "allgather", "ulysses", "tree"):
            try:
                build_attention(strategy=strategy, layout=layout)(x, x, x)
                messages.append("no error")
            except ValueError as err:
                messages.append(str(err))
    return messages


def test_metadata_check_names_the_odd_rank_out_of_three():
    per_rank = run_ranks(_mismatch_worker, 3, timeout=120)
    for messages in per_rank:
        assert all("group rank(s) [2] differ" in m for m in messages[:4]), messages
        assert all("group rank(s) [1] differ" in m for m in messages[4:]), messages

"""Ring attention on real gloo process groups against the full-sequence reference.

One spawn per world size runs every sub-case (start-up is paid once); the
parent rebuilds the same full tensors, computes the reference, unshards the
ranks' out / lse / dq / dk / dv and compares. Counters give message counts,
bytes and the work balance of each layout.
"""

from __future__ import annotations

import functools
import io

import pytest
import torch
import torch.distributed as dist

from lctrain.attention import AttentionCounters, Coords
from lctrain.attention.layouts import get_layout
from lctrain.attention.reference import reference_attention
from lctrain.attention.strategies.ring import ring_attention
from lctrain.distributed.spawn import run_ranks
from tests.helpers.cp_cases import (
    HEAD_DIM, TOLERANCES, Case, cases_for, doc_ids, full_tensors, ring_of, run_case, strided_groups,
)
from tests.helpers.shard import count_visible_pairs

WORLD_SIZES = (1, 2, 3, 4)


def _worker(rank: int, world: int, cases: tuple[Case, ...]):
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    groups = strided_groups(rank, world, {c.group_stride for c in cases if c.group_stride})
    results = {case.name: run_case(ring_attention, case, world, rank, groups) for case in cases}
    # Bytes, not tensors: tensors cross the queue as shared memory the exiting rank takes with it.
    buffer = io.BytesIO()
    torch.save(results, buffer)
    return buffer.getvalue()


@functools.lru_cache(maxsize=None)
def ring_results(world: int) -> list[dict]:
    per_rank = run_ranks(_worker, world, tuple(cases_for(world)))
    return [torch.load(io.BytesIO(data)) for data in per_rank]


def rank_outputs(case: Case, world: int, name: str, ring_index: int = 0) -> list[torch.Tensor]:
    """``name`` from each member of ring number ``ring_index``, in ring order."""
    per_rank = ring_results(world)
    stride = case.group_stride or 1
    return [per_rank[r][case.name][name] for r in range(ring_index, world, stride)]


ALL_CASES = [pytest.param(w, c, id=f"P{w}-{c.name}") for w in WORLD_SIZES for c in cases_for(w)]


@pytest.mark.parametrize("world, case", ALL_CASES)
def test_ring_matches_reference(world, case):
    q, k, v, dout = full_tensors(case)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out_ref, lse_ref = reference_attention(q, k, v, case.causal, doc_ids(case), case.window)
    out_ref.backward(dout)
    expected = dict(out=out_ref.detach(), lse=lse_ref, dq=q.grad, dk=k.grad, dv=v.grad)
    size = ring_of(case, world, 0)[0]
    layout = get_layout(case.layout, size)
    for ring_index in range(case.group_stride or 1):
        for name, want in expected.items():
            shards = rank_outputs(case, world, name, ring_index)
            assert not any(s.isnan().any() for s in shards), f"NaN in {name}"
            got = layout.unshard(shards, dim=2 if name == "lse" else 1)
            assert got.dtype == want.dtype, name
            torch.testing.assert_close(got, want, **TOLERANCES[case.dtype], msg=lambda m: f"{name}: {m}")
    if case.docs == "padded":  # rows that see no key: out 0, lse -inf, gradients 0
        pad = doc_ids(case).expand(case.batch, -1) == -1
        got_out = layout.unshard(rank_outputs(case, world, "out"), dim=1)
        got_lse = layout.unshard(rank_outputs(case, world, "lse"), dim=2)
        got_dk = layout.unshard(rank_outputs(case, world, "dk"), dim=1)
        assert (got_out[pad] == 0).all() and (got_dk[pad] == 0).all()
        assert (got_lse.transpose(1, 2)[pad] == float("-inf")).all()


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_ring_messages_bytes_and_pairs(world):
    """Forward: P - 1 K/V blocks per rank; backward: P - 1 K/V blocks + P dK/dV hops."""
    for case in cases_for(world):
        size = ring_of(case, world, 0)[0]
        phases = [r[case.name]["phases"] for r in ring_results(world)]
        elem = torch.finfo(getattr(torch, case.dtype)).bits // 8
        s_local, h_kv, coord_rows = case.seq // size, case.heads[1], case.batch if case.docs != "one" else 1
        kv_bytes = 2 * case.batch * s_local * h_kv * HEAD_DIM * elem + 2 * coord_rows * s_local * 8
        dkv_bytes = 2 * case.batch * s_local * h_kv * HEAD_DIM * elem  # fp32 / fp64 accumulators
        for p in phases:
            fwd, bwd = p["forward"], p["backward"]
            assert fwd["messages_sent"] == size - 1, case.name
            assert bwd["messages_sent"] == (2 * size - 1 if size > 1 else 0), case.name
            assert fwd["bytes_sent"] == (size - 1) * kv_bytes, case.name
            assert bwd["bytes_sent"] == (size - 1) * kv_bytes + (size * dkv_bytes if size > 1 else 0), case.name
            assert bwd["pairs"] == fwd["pairs"], case.name
        # Every visible pair computed exactly once over each ring.
        pos, doc = torch.arange(case.seq), doc_ids(case)
        rows = doc.shape[0] if doc.dim() == 2 else 1
        total = count_visible_pairs(pos, pos, doc, doc, case.causal, case.window) * (case.batch // rows)
        num_rings = case.group_stride or 1
        assert sum(p["forward"]["pairs"] for p in phases) == total * num_rings, case.name


@pytest.mark.parametrize("layout, low, high", [("contiguous", 1.5, None), ("striped", None, 1.05),
                                               ("zigzag", None, 1.05)])
def test_ring_causal_balance(layout, low, high):
    case = Case(layout, True, (1, 1), "one", dtype="float32", seq=256)
    pairs = [r[case.name]["phases"]["forward"]["pairs"] for r in ring_results(4)]
    ratio = max(pairs) / (sum(pairs) / len(pairs))
    if low is not None:
        assert ratio >= low, (layout, pairs)
    if high is not None:
        assert ratio <= high, (layout, pairs)


def test_ring_without_process_group_is_local_attention():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 12, 2, HEAD_DIM, generator=gen, dtype=torch.float64) for _ in range(3))
    doc = torch.tensor([0] * 5 + [1] * 7)
    counters = AttentionCounters()
    out, lse = ring_attention(q, k, v, Coords(torch.arange(12), doc), counters=counters)
    out_ref, lse_ref = reference_attention(q, k, v, True, doc)
    torch.testing.assert_close(out, out_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, lse_ref, atol=1e-12, rtol=1e-12)
    assert counters.messages_sent == 0 and counters.pairs == count_visible_pairs(
        torch.arange(12), torch.arange(12), doc, doc, True, None)


@pytest.mark.parametrize("k_heads, pos_shape, match", [(3, (12,), "multiple of the number of K/V heads"),
                                                       (2, (11,), "token_pos must have shape")])
def test_ring_rejects_bad_inputs(k_heads, pos_shape, match):
    q = torch.zeros(1, 12, 4, HEAD_DIM)
    k = v = torch.zeros(1, 12, k_heads, HEAD_DIM)
    with pytest.raises(ValueError, match=match):
        ring_attention(q, k, v, Coords(torch.zeros(pos_shape, dtype=torch.long), torch.zeros(12, dtype=torch.long)))

"""USP (Ulysses x ring) on real gloo groups against the full-sequence reference.

One spawn per world size runs every (Ulysses degree, case); the parent unshards
out / lse / dq / dk / dv and compares with ``reference_attention``. Degrees
cover the two ends (U = 1: pure ring, U = P: pure Ulysses) and the hybrid
(P = 4, U = 2), with K/V heads split and replicated.
"""

from __future__ import annotations

import functools
import io

import pytest
import torch
import torch.distributed as dist

from lctrain.attention import build_attention, get_layout, reference_attention
from lctrain.attention.strategies.usp import usp_attention
from lctrain.distributed.groups import build_parallel_groups
from lctrain.distributed.spawn import run_ranks
from tests.helpers.shard import count_visible_pairs, run_sharded
from tests.helpers.cp_cases import TOLERANCES, Case, doc_ids, full_tensors

DEGREES = {2: (1, 2), 4: (1, 2, 4)}  # world -> Ulysses degrees


def cases_for(world: int) -> list[Case]:
    cases = []
    for layout in ("contiguous", "zigzag", "striped"):
        for causal in (True, False):
            for heads in ((4, 4), (4, 2), (4, 1)):
                cases.append(Case(layout, causal, heads, "packed", window=None if causal else 7))
        cases.append(Case(layout, True, (4, 2), "one", window=9))
        cases.append(Case(layout, True, (4, 4), "one"))
        cases.append(Case(layout, False, (4, 1), "one"))
        cases.append(Case(layout, True, (4, 2), "packed", window=5))
        cases.append(Case(layout, True, (4, 2), "padded"))
        cases.append(Case(layout, True, (4, 1), "packed", batch=2, dtype="float32"))
    return cases


def _worker(rank: int, world: int):
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {}
    for degree in DEGREES[world]:
        groups = build_parallel_groups(rank, world, 1, world, ulysses_size=degree)
        ulysses_group, ring_group = groups.usp_groups
        usp = functools.partial(usp_attention, ulysses_group=ulysses_group, ring_group=ring_group)
        for case in cases_for(world):
            results[degree, case.name] = run_sharded(usp, get_layout(case.layout, world), rank,
                                                     *full_tensors(case), doc_ids(case), case.causal, case.window)
    # build_attention factors the default group itself when given ulysses_size.
    attn = build_attention("usp", get_layout("striped", world), ulysses_size=DEGREES[world][-1])
    x = torch.randn(1, 8, 4, 8, dtype=torch.float64)
    results["api"] = attn(x, x, x).shape
    buffer = io.BytesIO()
    torch.save(results, buffer)
    return buffer.getvalue()


@functools.lru_cache(maxsize=None)
def usp_results(world: int) -> list[dict]:
    return [torch.load(io.BytesIO(data)) for data in run_ranks(_worker, world)]


ALL_CASES = [pytest.param(w, u, c, id=f"P{w}-U{u}-{c.name}") for w in DEGREES for u in DEGREES[w]
             for c in cases_for(w)]


@pytest.mark.parametrize("world, degree, case", ALL_CASES)
def test_usp_matches_reference(world, degree, case):
    q, k, v, dout = full_tensors(case)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out_ref, lse_ref = reference_attention(q, k, v, case.causal, doc_ids(case), case.window)
    out_ref.backward(dout)
    expected = dict(out=out_ref.detach(), lse=lse_ref, dq=q.grad, dk=k.grad, dv=v.grad)
    layout = get_layout(case.layout, world)
    per_rank = [r[degree, case.name] for r in usp_results(world)]
    for name, want in expected.items():
        got = layout.unshard([r[name] for r in per_rank], dim=2 if name == "lse" else 1)
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, **TOLERANCES[case.dtype], msg=lambda m: f"{name}: {m}")

    # Every visible pair computed once over the cp group (each rank reports its head share).
    pos, doc = torch.arange(case.seq), doc_ids(case)
    rows = doc.shape[0] if doc.dim() == 2 else 1
    total = count_visible_pairs(pos, pos, doc, doc, case.causal, case.window) * (case.batch // rows)
    assert sum(r["phases"]["forward"]["pairs"] for r in per_rank) == total
    # Messages per rank: ring hops R - 1 forward, 2R - 1 backward; Ulysses collectives
    # (coords all-gather + q/k/v, out and lse all-to-alls forward; dout + dq/dk/dv backward).
    ring = world // degree
    exchanges_fwd, exchanges_bwd = (4, 2) if degree > 1 else (0, 0)
    for r in per_rank:
        assert r["phases"]["forward"]["messages_sent"] == ring - 1 + exchanges_fwd
        assert r["phases"]["backward"]["messages_sent"] == (2 * ring - 1 if ring > 1 else 0) + exchanges_bwd


@pytest.mark.parametrize("world", DEGREES)
def test_usp_built_over_the_default_group(world):
    assert all(r["api"] == (1, 8, 4, 8) for r in usp_results(world))


def test_usp_needs_its_subgroups():
    with pytest.raises(ValueError, match="usp_groups"):
        build_attention("usp", get_layout("striped", 2), group=object())

"""Tree attention on real gloo process groups against the full-sequence reference.

Same cases and inputs as test_ring.py (its Case, doc_ids and full_tensors),
each run once with the whole shard gathered at once and, for a subset, again
with ``query_chunk`` = 5 tokens (uneven against every shard length). One spawn
per world size runs every sub-case; the parent computes the reference,
unshards the ranks' out / lse / dq / dk / dv and compares. Counters give the
collective calls, bytes and work per rank.
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
from lctrain.attention.strategies.tree import tree_attention, tree_peak_query_tokens
from lctrain.distributed.spawn import run_ranks
from tests.helpers.shard import count_visible_pairs
from tests.helpers.cp_cases import (
    HEAD_DIM, TOLERANCES, Case, cases_for, doc_ids, full_tensors, ring_of, run_case, strided_groups,
)

WORLD_SIZES = (1, 2, 3, 4)
CHUNK = 5  # tokens per rank per chunk: uneven against s_local = 48 / P and 256 / 4


def chunked(case: Case) -> bool:
    """The cases also run with query_chunk=CHUNK: every docs kind, batch rows, float32, sub-groups."""
    return (case.docs == "padded" or (case.docs == "packed" and case.window is not None)
            or case.batch > 1 or case.group_stride > 0)


def runs_on(world: int, case: Case) -> bool:
    """test_ring's full cross on 1 and 2 ranks; on 3 and 4 (more processes than the 2 CI cores)
    one of the two head counts per (layout, causal, docs, window), alternating, so every axis
    is still covered, plus every extra case (padding, float32, batch rows, sub-groups, seq 256)."""
    in_cross = case.dtype == "float64" and case.docs != "padded" and case.batch == 1 and not case.group_stride
    if world <= 2 or not in_cross:
        return True
    heads = ((4, 4), (4, 2) if case.causal else (4, 1))
    rotation = int(case.causal) + ("one", "packed").index(case.docs) + (case.window is not None)
    return heads.index(case.heads) == rotation % 2


def tree_cases(world: int) -> list[tuple[Case, int | None]]:
    """(case, query_chunk) pairs; the seq-256 balance cases run unchunked only."""
    cases = [c for c in cases_for(world) if runs_on(world, c)]
    return [(c, None) for c in cases] + [(c, CHUNK) for c in cases if c.seq == 48 and chunked(c)]


def key(case: Case, query_chunk: int | None) -> str:
    return f"{case.name}-chunk{query_chunk}"


def _worker(rank: int, world: int, cases: tuple[tuple[Case, int | None], ...]):
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    groups = strided_groups(rank, world, {c.group_stride for c, _ in cases if c.group_stride})
    results = {key(case, query_chunk): run_case(functools.partial(tree_attention, query_chunk=query_chunk),
                                                case, world, rank, groups)
               for case, query_chunk in cases}
    # Bytes, not tensors: tensors cross the queue as shared memory the exiting rank takes with it.
    buffer = io.BytesIO()
    torch.save(results, buffer)
    return buffer.getvalue()


@functools.lru_cache(maxsize=None)
def tree_results(world: int) -> list[dict]:
    per_rank = run_ranks(_worker, world, tuple(tree_cases(world)))
    return [torch.load(io.BytesIO(data)) for data in per_rank]


def rank_outputs(case: Case, query_chunk, world: int, name: str, group_index: int = 0) -> list[torch.Tensor]:
    """``name`` from each member of group number ``group_index``, in group-rank order."""
    stride = case.group_stride or 1
    return [tree_results(world)[r][key(case, query_chunk)][name] for r in range(group_index, world, stride)]


ALL_CASES = [pytest.param(w, c, chunk, id=f"P{w}-{c.name}-chunk{chunk}")
             for w in WORLD_SIZES for c, chunk in tree_cases(w)]


@pytest.mark.parametrize("world, case, query_chunk", ALL_CASES)
def test_tree_matches_reference(world, case, query_chunk):
    q, k, v, dout = full_tensors(case)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out_ref, lse_ref = reference_attention(q, k, v, case.causal, doc_ids(case), case.window)
    out_ref.backward(dout)
    expected = dict(out=out_ref.detach(), lse=lse_ref, dq=q.grad, dk=k.grad, dv=v.grad)
    layout = get_layout(case.layout, ring_of(case, world, 0)[0])
    for group_index in range(case.group_stride or 1):
        for name, want in expected.items():
            shards = rank_outputs(case, query_chunk, world, name, group_index)
            assert not any(s.isnan().any() for s in shards), f"NaN in {name}"
            got = layout.unshard(shards, dim=2 if name == "lse" else 1)
            assert got.dtype == want.dtype, name
            torch.testing.assert_close(got, want, **TOLERANCES[case.dtype], msg=lambda m: f"{name}: {m}")
            if query_chunk is not None:  # chunking changes the schedule, not the numbers
                whole = layout.unshard(rank_outputs(case, None, world, name, group_index),
                                       dim=2 if name == "lse" else 1)
                torch.testing.assert_close(got, whole, atol=1e-13 if case.dtype == "float64" else 1e-6,
                                           rtol=1e-13 if case.dtype == "float64" else 1e-6)
    if case.docs == "padded":  # rows that see no key: out 0, lse -inf, gradients 0
        pad = doc_ids(case).expand(case.batch, -1) == -1
        got = {name: layout.unshard(rank_outputs(case, query_chunk, world, name), dim=2 if name == "lse" else 1)
               for name in ("out", "lse", "dq", "dk")}
        assert (got["out"][pad] == 0).all() and (got["dq"][pad] == 0).all() and (got["dk"][pad] == 0).all()
        assert (got["lse"].transpose(1, 2)[pad] == float("-inf")).all()


def expected_traffic(case: Case, size: int, query_chunk) -> dict[str, tuple[int, int]]:
    """(messages, bytes) per rank per phase, from the formulas in tree.py's docstring."""
    if size == 1:
        return {"forward": (0, 0), "backward": (0, 0)}
    b, s, (h, _), d = case.batch, case.seq // size, case.heads, HEAD_DIM
    elem = torch.finfo(getattr(torch, case.dtype)).bits // 8  # float64 / float32: accumulates in the same
    rows = b if case.docs != "one" and case.batch > 1 else 1
    chunks = -(-s // (query_chunk or s))
    forward = (size - 1) * (16 * rows * s + b * s * h * d * elem + 2 * b * h * s * elem + b * s * h * (d + 1) * elem)
    backward = (size - 1) * (2 * b * s * h * d * elem + 2 * b * h * s * elem + b * s * h * d * elem)
    return {"forward": (1 + 3 * chunks, forward), "backward": (3 * chunks, backward)}


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_tree_collectives_bytes_and_pairs(world):
    """O(1) collectives per chunk whatever P: forward 1 + 3 per chunk, backward 3 per chunk."""
    for case, query_chunk in tree_cases(world):
        size = ring_of(case, world, 0)[0]
        phases = [r[key(case, query_chunk)]["phases"] for r in tree_results(world)]
        for phase, (messages, sent) in expected_traffic(case, size, query_chunk).items():
            for p in phases:
                assert p[phase]["messages_sent"] == messages, (case.name, query_chunk, phase)
                assert p[phase]["bytes_sent"] == sent, (case.name, query_chunk, phase)
        for p in phases:
            assert p["backward"]["pairs"] == p["forward"]["pairs"], case.name
        # Every visible pair computed exactly once over each group, chunked or not.
        pos, doc = torch.arange(case.seq), doc_ids(case)
        rows = doc.shape[0] if doc.dim() == 2 else 1
        total = count_visible_pairs(pos, pos, doc, doc, case.causal, case.window) * (case.batch // rows)
        assert sum(p["forward"]["pairs"] for p in phases) == total * (case.group_stride or 1), case.name
        if query_chunk is not None:
            whole = [r[key(case, None)]["phases"]["forward"]["pairs"] for r in tree_results(world)]
            assert [p["forward"]["pairs"] for p in phases] == whole, case.name


@pytest.mark.parametrize("layout, low, high", [("contiguous", 1.5, None), ("striped", None, 1.05),
                                               ("zigzag", None, 1.05)])
def test_tree_causal_balance(layout, low, high):
    """Each rank serves every query against its own keys: balance follows the K/V layout."""
    case = Case(layout, True, (1, 1), "one", dtype="float32", seq=256)
    pairs = [r[key(case, None)]["phases"]["forward"]["pairs"] for r in tree_results(4)]
    ratio = max(pairs) / (sum(pairs) / len(pairs))
    if low is not None:
        assert ratio >= low, (layout, pairs)
    if high is not None:
        assert ratio <= high, (layout, pairs)


def test_tree_peak_memory_follows_query_chunk():
    assert tree_peak_query_tokens(48, 4) == 192 and tree_peak_query_tokens(48, 4, CHUNK) == 20
    assert tree_peak_query_tokens(48, 1, CHUNK) == 48 and tree_peak_query_tokens(4, 4, CHUNK) == 16


def test_tree_without_process_group_is_local_attention():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 12, 2, HEAD_DIM, generator=gen, dtype=torch.float64) for _ in range(3))
    q.requires_grad_()
    doc = torch.tensor([0] * 5 + [1] * 7)
    counters = AttentionCounters()
    out, lse = tree_attention(q, k, v, Coords(torch.arange(12), doc), counters=counters, query_chunk=CHUNK)
    out.sum().backward()
    q_ref = q.detach().clone().requires_grad_()
    out_ref, lse_ref = reference_attention(q_ref, k, v, True, doc)
    out_ref.sum().backward()
    torch.testing.assert_close(out, out_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, lse_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(q.grad, q_ref.grad, atol=1e-12, rtol=1e-12)
    assert counters.messages_sent == 0 and counters.pairs == 2 * count_visible_pairs(
        torch.arange(12), torch.arange(12), doc, doc, True, None)


@pytest.mark.parametrize("k_heads, pos_shape, chunk, match", [
    (3, (12,), None, "multiple of the number of K/V heads"),
    (2, (11,), None, "token_pos must have shape"),
    (2, (12,), 0, "query_chunk must be a positive"),
    (2, (12,), 2.5, "query_chunk must be a positive"),
])
def test_tree_rejects_bad_inputs(k_heads, pos_shape, chunk, match):
    q = torch.zeros(1, 12, 4, HEAD_DIM)
    k = v = torch.zeros(1, 12, k_heads, HEAD_DIM)
    with pytest.raises(ValueError, match=match):
        tree_attention(q, k, v, Coords(torch.zeros(pos_shape, dtype=torch.long), torch.zeros(12, dtype=torch.long)),
                       query_chunk=chunk)

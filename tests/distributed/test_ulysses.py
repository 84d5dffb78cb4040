"""Ulysses (all-to-all) context parallelism vs the single-device reference, on real gloo groups.

One spawn per world size (1, 2, 4) runs every sub-case inside the ranks and
returns the local shards as numpy arrays; the parametrised tests below unshard
them and compare with ``reference_attention`` on the full tensors (float64 at
1e-10, float32 at 1e-5). Head configs h=4 with h_kv in (4, 2, 1) cover split
K/V heads and replicated ones (h_kv=1 at P=2, h_kv=2 and 1 at P=4).
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torch.distributed as dist

from lctrain.attention import AttentionCounters, Coords, Mask, get_layout
from lctrain.attention.strategies.ulysses import check_ulysses_inputs, ulysses_attention, usable_degrees
from lctrain.distributed.spawn import run_ranks
from tests.helpers.shard import assert_unsharded_close, count_visible_pairs, reference_results, run_sharded

BATCH = 2  # > 1 so a mix-up of batch and rank dims in the all-to-all shows
SEQ_LEN = 24  # a multiple of 2P for P = 1, 2, 4 (zigzag)
HEADS = 4
HEAD_DIM = 8
KV_HEADS = (4, 2, 1)  # MHA, GQA, MQA
# one document; packed docs (boundaries inside shards, at shard edges 12, and documents
# spanning several shards); packed docs followed by padding (doc -1).
DOC_LENGTHS = {"one": [24], "packed": [5, 7, 3, 9], "padded": [5, 7, 3, 4, -5]}
WINDOWS = (None, 4)
LAYOUTS = ("contiguous", "zigzag", "striped")
WORLD_SIZES = (1, 2, 4)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}

# (layout, causal, kv_heads, docs, window, dtype): the full cross in float64, a few in float32.
F64_CASES = list(itertools.product(LAYOUTS, (True, False), KV_HEADS, tuple(DOC_LENGTHS), WINDOWS,
                                   (torch.float64,)))
F32_CASES = [(layout, True, 1, "packed", None, torch.float32) for layout in LAYOUTS]
F32_CASES += [(layout, False, 2, "padded", 4, torch.float32) for layout in LAYOUTS]
CASES = F64_CASES + F32_CASES

# (heads, kv_heads) that no Ulysses degree of this size can shard.
BAD_HEADS = {2: (6, 3), 4: (6, 6)}


def doc_ids(name: str) -> torch.Tensor:
    """Doc ids from lengths; a negative length is that many padding tokens (-1)."""
    ids = [torch.full((abs(n),), -1 if n < 0 else i) for i, n in enumerate(DOC_LENGTHS[name])]
    return torch.cat(ids)


def make_inputs(case_index: int, case):
    _layout, _causal, kv_heads, _docs, _window, dtype = case
    gen = torch.Generator().manual_seed(2000 + case_index)
    q = torch.randn(BATCH, SEQ_LEN, HEADS, HEAD_DIM, generator=gen, dtype=torch.float64)
    k = torch.randn(BATCH, SEQ_LEN, kv_heads, HEAD_DIM, generator=gen, dtype=torch.float64)
    v = torch.randn(BATCH, SEQ_LEN, kv_heads, HEAD_DIM, generator=gen, dtype=torch.float64)
    dout = torch.randn(BATCH, SEQ_LEN, HEADS, HEAD_DIM, generator=gen, dtype=torch.float64)
    return [x.to(dtype) for x in (q, k, v, dout)]


def _run_case(rank, world_size, group, case_index, case):
    layout_name, causal, _kv, docs, window, _dtype = case
    layout = get_layout(layout_name, world_size)
    q, k, v, dout = make_inputs(case_index, case)
    attention = functools.partial(ulysses_attention, group=group)
    result = run_sharded(attention, layout, rank, q, k, v, dout, doc_ids(docs), causal, window)
    # numpy arrays: torch tensors would cross the result queue as shared memory that
    # vanishes when the rank exits.
    phases = result.pop("phases")
    return {**{name: x.numpy() for name, x in result.items()}, "counters": phases}


def _bad_heads_message(world_size):
    """Every rank must refuse the unshardable head count before communicating (else: hang)."""
    heads, kv_heads = BAD_HEADS[world_size]
    q = torch.zeros(1, 4, heads, HEAD_DIM)
    kv = torch.zeros(1, 4, kv_heads, HEAD_DIM)
    try:
        ulysses_attention(q, kv, kv, Coords(torch.arange(4), torch.zeros(4, dtype=torch.long)), None)
    except ValueError as error:
        return str(error)
    return None


def _rank_main(rank, world_size):
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = [_run_case(rank, world_size, None, i, case) for i, case in case_ids(world_size)]
    sub = None
    if world_size == 4:  # two independent groups of 2: group ranks differ from global ranks
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        sub = _run_case(rank % 2, 2, groups[rank // 2], SUBGROUP_CASE, CASES[SUBGROUP_CASE])
    bad = _bad_heads_message(world_size) if world_size in BAD_HEADS else None
    dist.barrier()  # a rank that went on communicating after the bad call would hang here
    return results, sub, bad


def _as_tensors(result):
    return {name: value if name == "counters" else torch.from_numpy(value) for name, value in result.items()}


@functools.cache
def spawn(world_size: int):
    """Per rank: (tensors of every case, the sub-group case or None, the bad-heads error or None)."""
    return [([_as_tensors(r) for r in results], sub and _as_tensors(sub), bad)
            for results, sub, bad in run_ranks(_rank_main, world_size)]


def runs_on(world_size: int, case) -> bool:
    """The full cross on 1 and 2 ranks; on 4 (more processes than the 2 CI cores) one head
    count per (layout, causal, docs, window), rotating, so every axis is still covered,
    plus every float32 case."""
    _layout, causal, kv_heads, docs, window, dtype = case
    if world_size <= 2 or dtype != torch.float64:
        return True
    rotation = int(causal) + tuple(DOC_LENGTHS).index(docs) + WINDOWS.index(window) + LAYOUTS.index(_layout)
    return KV_HEADS.index(kv_heads) == rotation % len(KV_HEADS)


def case_ids(world_size):
    return [(i, case) for i, case in enumerate(CASES) if runs_on(world_size, case)]


# kv_heads=1 (replicated K/V at P=2), packed docs, causal with a window, striped layout.
SUBGROUP_CASE = CASES.index(("striped", True, 1, "packed", 4, torch.float64))

PARAMS = [pytest.param(ws, pos, i, case, id=f"P{ws}-{case[0]}-{'causal' if case[1] else 'full'}-kv{case[2]}-"
                       f"{case[3]}-w{case[4]}-{str(case[5])[6:]}")
          for ws in WORLD_SIZES for pos, (i, case) in enumerate(case_ids(ws))]


def reference(case_index, case):
    _layout, causal, _kv, docs, window, _dtype = case
    return reference_results(*make_inputs(case_index, case), causal, doc_ids(docs), window)


def check_against_reference(per_rank, case_index, case):
    layout = get_layout(case[0], len(per_rank))
    assert_unsharded_close(per_rank, layout, reference(case_index, case), TOLERANCE[case[5]])
    return layout


def expected_bytes(world_size, case):
    """Per rank and phase, from the module's convention (all-to-all: (P - 1) / P of the buffer)."""
    dtype, kv_heads = case[5], case[2]
    s_local, p = SEQ_LEN // world_size, world_size
    item = torch.tensor([], dtype=dtype).element_size()
    acc = 8 if dtype == torch.float64 else 4
    kv_sent = max(kv_heads, p)  # K/V heads after replication
    tokens = BATCH * s_local * HEAD_DIM  # elements of one head of the local shard
    coords = 2 * s_local * 8
    forward = (p - 1) * coords + (p - 1) * (tokens * (HEADS + 2 * kv_sent) * item // p
                                             + tokens * HEADS * item // p + BATCH * s_local * HEADS * acc // p)
    backward = (p - 1) * (tokens * HEADS * item // p + tokens * (HEADS + 2 * kv_sent) * acc // p)
    return forward, backward


@pytest.mark.parametrize("world_size, position, case_index, case", PARAMS)
def test_matches_reference(world_size, position, case_index, case):
    per_rank = [results[position] for results, _, _ in spawn(world_size)]
    layout = check_against_reference(per_rank, case_index, case)
    _layout, causal, _kv, docs, window, _dtype = case

    if docs == "padded":  # padding rows: output exactly 0, lse -inf, no gradient into q
        pad = doc_ids(docs) == -1
        out = layout.unshard([r["out"] for r in per_rank], dim=1)
        lse = layout.unshard([r["lse"] for r in per_rank], dim=2)
        dq = layout.unshard([r["dq"] for r in per_rank], dim=1)
        assert (out[:, pad] == 0).all() and (dq[:, pad] == 0).all()
        assert (lse[:, :, pad] == float("-inf")).all()

    # Work: the ranks' shares add up to the unmasked token pairs of the full batch, evenly.
    positions, docs_full = torch.arange(SEQ_LEN), doc_ids(docs)
    total = BATCH * count_visible_pairs(positions, positions, docs_full, docs_full, causal, window)
    forward_bytes, backward_bytes = expected_bytes(world_size, case)
    for phase, messages, sent in (("forward", 4, forward_bytes), ("backward", 2, backward_bytes)):
        pairs = [r["counters"][phase]["pairs"] for r in per_rank]
        assert sum(pairs) == total and max(pairs) - min(pairs) <= 1
        expected_messages = messages if world_size > 1 else 0
        assert all(r["counters"][phase]["messages_sent"] == expected_messages for r in per_rank)
        assert all(r["counters"][phase]["bytes_sent"] == sent for r in per_rank)


def test_subgroups_use_group_ranks():
    subs = [sub for _, sub, _ in spawn(4)]
    for pair in (subs[:2], subs[2:]):
        check_against_reference(pair, SUBGROUP_CASE, CASES[SUBGROUP_CASE])


@pytest.mark.parametrize("world_size", sorted(BAD_HEADS))
def test_unshardable_heads_raise_on_every_rank(world_size):
    messages = [bad for _, _, bad in spawn(world_size)]
    heads, kv_heads = BAD_HEADS[world_size]
    assert all(m is not None and f"degrees that work for h={heads}, h_kv={kv_heads}" in m for m in messages)
    assert str(usable_degrees(heads, kv_heads)) in messages[0]


def test_usable_degrees():
    assert usable_degrees(4, 4) == [1, 2, 4]
    assert usable_degrees(4, 1) == [1, 2, 4]  # K/V replicated beyond h_kv
    assert usable_degrees(6, 3) == [1, 3, 6]  # 2 neither divides 3 nor is divided by it
    assert usable_degrees(32, 8) == [1, 2, 4, 8, 16, 32]


def test_single_rank_without_process_group():
    """group=None with torch.distributed uninitialised is plain local attention."""
    q, k, v, dout = make_inputs(0, CASES[0])
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    counters = AttentionCounters()
    out, lse = ulysses_attention(q, k, v, Coords(torch.arange(SEQ_LEN), torch.zeros(SEQ_LEN, dtype=torch.long)),
                                 None, counters=counters)
    out.backward(dout)
    expected = reference(0, CASES[0])
    torch.testing.assert_close(out, expected["out"], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, expected["lse"], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(k.grad, expected["dk"], atol=1e-10, rtol=1e-10)
    assert counters.messages_sent == 0 and counters.bytes_sent == 0


@pytest.mark.parametrize("change, num_ranks, match", [
    (dict(q=torch.zeros(1, 24, 6, 8), k=torch.zeros(1, 24, 6, 8), v=torch.zeros(1, 24, 6, 8)), 4,
     r"degrees that work for h=6, h_kv=6: \[1, 2, 3, 6\]"),
    (dict(q=torch.zeros(1, 24, 6, 8), k=torch.zeros(1, 24, 3, 8), v=torch.zeros(1, 24, 3, 8)), 2,
     r"degrees that work for h=6, h_kv=3: \[1, 3, 6\]"),
    (dict(q=torch.zeros(1, 24, 4, 8)), 3, r"h=4, h_kv=4: \[1, 2, 4\]"),
    (dict(k=torch.zeros(1, 24, 3, 8), v=torch.zeros(1, 24, 3, 8)), 1, "multiple of the number of K/V heads"),
    (dict(v=torch.zeros(1, 24, 2, 8)), 2, "same shape"),
    (dict(q_pos=torch.arange(12)), 2, r"token_pos must have shape \(24,\)"),
    (dict(q_doc=torch.zeros(24)), 2, "integer tensor"),
    (dict(window=0), 2, "positive number"),
])
def test_invalid_inputs_name_the_fix(change, num_ranks, match):
    args = dict(q=torch.zeros(1, 24, 4, 8), k=torch.zeros(1, 24, 4, 8), v=torch.zeros(1, 24, 4, 8),
                q_pos=torch.arange(24), q_doc=torch.zeros(24, dtype=torch.long), window=None)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        Mask(window=args["window"])
        check_ulysses_inputs(args["q"], args["k"], args["v"], Coords(args["q_pos"], args["q_doc"]), num_ranks)


def test_invalid_inputs_raise_without_process_group():
    q = torch.zeros(1, 24, 4, 8)
    with pytest.raises(ValueError, match="same shape"):
        ulysses_attention(q, q, torch.zeros(1, 24, 2, 8), Coords(torch.arange(24), torch.zeros(24, dtype=torch.long)),
                          None)

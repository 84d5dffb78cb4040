"""The analytic context-parallel model (lctrain.attention.balance) against the mask rule.

Pair counts must equal ``count_visible_pairs`` and the dense ``visible_mask`` for every layout,
world size, document mix and window; the byte and message formulas are checked on cases
worked out by hand. (bench/cp_balance.py checks the same model against the real strategies'
counters on gloo ranks.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lctrain.attention import Coords, Mask, get_layout
from lctrain.attention.balance import (
    STRATEGIES, ModelShape, RankWork, Traffic, doc_bounds, docs_from_lengths, lognormal_doc_lengths,
    one_document, pairs_against_all_keys, skip_reason, split_share, strategy_work, traffic_per_rank,
    visible_pairs, work_matrix)
from lctrain.attention.layouts import LAYOUT_NAMES
from lctrain_kernels.mask import PAD_DOC, count_visible_pairs, visible_mask

SEQ = 96  # a multiple of 2P for P = 1, 2, 3, 4, 6, 8 (zigzag)
MASKS = [Mask(causal=True), Mask(causal=True, window=7), Mask(causal=False), Mask(causal=False, window=5)]


def _docs(kind: str) -> np.ndarray:
    if kind == "one":
        return one_document(SEQ)
    if kind == "packed":
        return docs_from_lengths(lognormal_doc_lengths(SEQ, seed=3, median=12, sigma=1.0))
    padded = docs_from_lengths([40, 30, 16, 10])
    padded[-10:] = PAD_DOC  # a padded tail: attends nothing, seen by nothing
    return padded


def _coords(pos: np.ndarray, doc: np.ndarray) -> Coords:
    return Coords(torch.from_numpy(pos), torch.from_numpy(doc[pos]))


def _dense_pairs(q_pos: np.ndarray, k_pos: np.ndarray, doc: np.ndarray, mask: Mask) -> int:
    return int(visible_mask(_coords(q_pos, doc), _coords(k_pos, doc), mask).sum())


@pytest.mark.parametrize("kind", ["one", "packed", "padded"])
@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_work_matrix_equals_the_mask_rule(kind, mask):
    doc = _docs(kind)
    for name in LAYOUT_NAMES:
        for cp in (1, 2, 3, 4, 8):
            layout = get_layout(name, cp)
            w = work_matrix(layout, doc, mask)
            shards = [layout.positions(SEQ, r).numpy() for r in range(cp)]
            for r in range(cp):
                for j in range(cp):
                    want = int(count_visible_pairs(_coords(shards[r], doc), _coords(shards[j], doc), mask))
                    assert w[r, j] == want, (name, cp, r, j)
            assert w.sum() == _dense_pairs(np.arange(SEQ), np.arange(SEQ), doc, mask)


@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_pairs_of_unsorted_queries_equal_the_dense_mask(mask):
    doc = _docs("packed")
    rng = np.random.default_rng(0)
    q_pos = rng.permutation(SEQ)[:40]  # queries in any order; keys must be increasing
    k_pos = np.sort(rng.permutation(SEQ)[:50])
    assert visible_pairs(q_pos, k_pos, doc, mask) == _dense_pairs(q_pos, k_pos, doc, mask)


@pytest.mark.parametrize("kind", ["one", "packed", "padded"])
@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_pairs_against_all_keys_equal_the_searched_count(kind, mask):
    doc = _docs(kind)
    everything = np.arange(SEQ)
    for name in LAYOUT_NAMES:
        pos = get_layout(name, 4).positions(SEQ, 1).numpy()
        assert pairs_against_all_keys(pos, doc, mask) == visible_pairs(pos, everything, doc, mask)


def test_hand_counted_pairs():
    doc = docs_from_lengths([3, 2])  # documents [0, 1, 2] and [3, 4]
    everything = np.arange(5)
    assert visible_pairs(everything, everything, doc) == 6 + 3  # causal triangles
    assert visible_pairs(everything, everything, doc, Mask(causal=False)) == 9 + 4
    assert visible_pairs(everything, everything, doc, Mask(causal=True, window=2)) == 5 + 3
    assert visible_pairs(np.array([2]), np.array([0, 1]), doc) == 2


def test_doc_bounds_and_lengths():
    lengths = lognormal_doc_lengths(1000, seed=1, median=30, sigma=1.2)
    assert sum(lengths) == 1000 and min(lengths) >= 1
    assert lengths == lognormal_doc_lengths(1000, seed=1, median=30, sigma=1.2)  # deterministic
    start, end = doc_bounds(docs_from_lengths([2, 3]))
    assert start.tolist() == [0, 0, 2, 2, 2] and end.tolist() == [2, 2, 5, 5, 5]


def test_split_share_sums_to_the_total():
    for pairs in (0, 1, 7, 100, 101):
        for parts in (1, 2, 3, 4):
            shares = [split_share(pairs, parts, i) for i in range(parts)]
            assert sum(shares) == pairs and max(shares) - min(shares) <= 1


@pytest.mark.parametrize("name", LAYOUT_NAMES)
def test_every_strategy_reports_the_same_total(name):
    doc = _docs("packed")
    w = work_matrix(get_layout(name, 4), doc, Mask(causal=True))
    for strategy in STRATEGIES:
        work = strategy_work(strategy, w, ulysses_degree=2)
        assert work.total == w.sum(), strategy
    assert strategy_work("ring", w).per_rank == w.sum(axis=1).tolist()
    assert strategy_work("tree", w).per_rank == w.sum(axis=0).tolist()
    assert strategy_work("allgather", w).ring_step_max is None


def test_one_document_contiguous_balance_is_exact():
    doc = one_document(SEQ)
    for cp in (2, 4, 8):
        ring = strategy_work("ring", work_matrix(get_layout("contiguous", cp), doc))
        local = SEQ // cp  # rank r: r full blocks of local^2 pairs plus its own triangle
        assert ring.per_rank == [r * local * local + local * (local + 1) // 2 for r in range(cp)]
        zigzag = strategy_work("ring", work_matrix(get_layout("zigzag", cp), doc))
        assert zigzag.balance == 1.0
    ulysses = strategy_work("ulysses", work_matrix(get_layout("contiguous", 4), doc))
    assert max(ulysses.per_rank) - min(ulysses.per_rank) <= 1


def test_usp_splits_each_ring_step_over_its_group():
    w = np.arange(16, dtype=np.int64).reshape(4, 4) + 1  # any 4-rank work matrix
    work = strategy_work("usp", w, ulysses_degree=2)
    groups = w.reshape(2, 2, 2, 2).sum(axis=(1, 3))  # [[g0 x g0, g0 x g1], [g1 x g0, g1 x g1]]
    step0 = [split_share(int(groups[0, 0]), 2, 0), split_share(int(groups[0, 0]), 2, 1),
             split_share(int(groups[1, 1]), 2, 0), split_share(int(groups[1, 1]), 2, 1)]
    step1 = [split_share(int(groups[0, 1]), 2, 0), split_share(int(groups[0, 1]), 2, 1),
             split_share(int(groups[1, 0]), 2, 0), split_share(int(groups[1, 0]), 2, 1)]
    assert work.per_rank == [a + b for a, b in zip(step0, step1)]
    assert work.ring_step_max == [max(step0), max(step1)]
    assert work.lockstep_over_mean == pytest.approx(sum(work.ring_step_max) / work.mean)


def test_rank_work_figures():
    work = RankWork([1, 3], ring_step_max=[2, 3])
    assert (work.total, work.mean, work.balance, work.lockstep_over_mean) == (4, 2.0, 1.5, 2.5)


# ----------------------------------------------------------------------------- traffic

TINY = ModelShape(batch=1, heads=4, h_kv=2, head_dim=8, dtype="bf16")


def test_ring_and_allgather_bytes_by_hand():
    # P = 2, 16 tokens: s = 8; K/V = 2*8*2*8*2 = 512 B, coords = 2*8*8 = 128 B, fp32 dK/dV = 1024 B.
    assert traffic_per_rank("ring", 2, 16, TINY) == Traffic(640, 640 + 2 * 1024, 1, 3)
    assert traffic_per_rank("allgather", 2, 16, TINY) == Traffic(640, 512 + 1024, 2, 2)
    # P = 4: 3 hops of 4-token blocks (256 + 64 B), 4 accumulators of 512 B.
    assert traffic_per_rank("ring", 4, 16, TINY) == Traffic(960, 960 + 2048, 3, 7)


def test_ulysses_bytes_by_hand():
    # P = 2, s = 8: each all-to-all sends half of the buffer. Forward: coords 128, q/k/v rows
    # 8*8*(2+2)*2 = 512 (1 K/V head per rank), out 8*2*8*2 = 256, lse 8*2*4 = 64.
    # Backward: dout 256, fp32 dq/dk/dv 8*8*4*4 = 1024.
    assert traffic_per_rank("ulysses", 2, 16, TINY) == Traffic(128 + 512 + 256 + 64, 256 + 1024, 4, 2)
    # P = 4 > h_kv = 2: each K/V head is sent twice, so every rank still gets one. s = 4, 3 rows:
    # coords 3*64 = 192, q/k/v 3*4*8*(1+2)*2 = 576, out 3*4*8*2 = 192, lse 3*4*4 = 48.
    assert traffic_per_rank("ulysses", 4, 16, TINY).forward == 192 + 576 + 192 + 48


def test_usp_is_ulysses_plus_a_ring_of_groups():
    # P = 4, U = 2: Ulysses at degree 2 on s = 4, then a ring of R = 2 groups of 8 tokens with
    # 1 K/V head: hop 2*8*1*8*2 + 128 = 384 B, accumulators 2*8*1*8*4 = 512 B each.
    shape = TINY
    ring_fwd, ring_bwd = 384, 384 + 2 * 512
    ulysses_fwd = 64 + 4 * 8 * 4 * 2 + 4 * 2 * 8 * 2 + 4 * 2 * 4  # coords, q/k/v, out, lse
    ulysses_bwd = 4 * 2 * 8 * 2 + 4 * 8 * 4 * 2  # dout; gradients back in bf16
    assert traffic_per_rank("usp", 4, 16, shape, ulysses_degree=2) == Traffic(
        ulysses_fwd + ring_fwd, ulysses_bwd + ring_bwd, 5, 5)


def test_tree_bytes_by_hand():
    # P = 2, s = 8, h = 4: coords 128, q 8*4*8*2 = 512, lse all-reduce 2*4*8*4 = 256,
    # (out, den) reduce-scatter 8*4*9*4 = 1152; backward (q, dout) 1024, (lse, delta) 256, dq 1024.
    assert traffic_per_rank("tree", 2, 16, TINY) == Traffic(128 + 512 + 256 + 1152, 1024 + 256 + 1024, 4, 3)


def test_one_rank_sends_nothing_and_shapes_are_checked():
    for strategy in STRATEGIES:
        assert traffic_per_rank(strategy, 1, 16, TINY) == Traffic()
    with pytest.raises(ValueError, match="multiple of h_kv"):
        ModelShape(heads=6, h_kv=4)
    with pytest.raises(ValueError, match="dtype"):
        ModelShape(dtype="int8")
    assert ModelShape(dtype="fp64").acc_bytes == 8 and ModelShape().acc_bytes == 4


def test_skip_reasons():
    shape = ModelShape(heads=32, h_kv=8)
    assert skip_reason("ring", 16, shape) is None
    assert skip_reason("ulysses", 16, shape) is None  # h_kv divides P: K/V heads replicated
    assert "not usable" in skip_reason("ulysses", 12, shape)
    assert "dividing P" in skip_reason("usp", 2, shape, ulysses_degree=2)  # P == U
    assert skip_reason("usp", 8, shape, ulysses_degree=2) is None

"""The tile plan of ``plan`` as one Triton kernel per side, for GPU calls.

The torch version costs ~140 small device ops per attention call, which a GPU pays in launch
latency when blocks are short; this one costs a dozen ops and two launches. One program per
(16-token run, batch row) reduces its run's positions and documents and binary searches the
other side's sorted documents, positions and padding counts. It computes exactly what the
torch version computes (tests compare the two bit for bit under the interpreter), which stays
the CPU path: the interpreter runs these scalar binary searches slowly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..mask import PAD_DOC
from .consts import BIG, INFO_FIELDS, SUB
from .launch import device_fn, interpret_mode, launch_grid, tl


@device_fn
def _search(ARR, n, value, RIGHT: tl.constexpr, STEPS: tl.constexpr):
    """torch.searchsorted on a sorted int64 row of n values: the first index whose value is
    >= ``value`` (> when RIGHT). STEPS must exceed log2(n + 1)."""
    lo = tl.zeros([], dtype=tl.int64)
    hi = lo + n
    for _ in range(STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        x = tl.load(ARR + mid, mask=active, other=0)
        if RIGHT:
            go = active & (x <= value)
        else:
            go = active & (x < value)
        lo = tl.where(go, mid + 1, lo)
        hi = tl.where(active & ~go, mid, hi)
    return lo


@device_fn
def _span(DOCS, POS, n, doc_first, doc_last, lower, upper, docs_sorted, pos_sorted, STEPS: tl.constexpr):
    """[lo, hi) of other-side tokens with doc in [doc_first, doc_last] and pos in [lower, upper]
    (+-BIG: unbounded), each bound dropped where its side is not sorted."""
    lo = tl.where(docs_sorted, _search(DOCS, n, doc_first, False, STEPS), 0)
    hi = tl.where(docs_sorted, _search(DOCS, n, doc_last, True, STEPS), n)
    lo = tl.maximum(lo, tl.where(pos_sorted, _search(POS, n, lower, False, STEPS), 0))
    hi = tl.minimum(hi, tl.where(pos_sorted, _search(POS, n, upper, True, STEPS), n))
    return lo, hi


def _plan_runs(THIS_POS, THIS_DOC, OTHER_POS, OTHER_DOCS, OTHER_PADS, FLAGS, INFO, seq_this, seq_other,
               num_runs, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, QUERY_SIDE: tl.constexpr,
               STEPS: tl.constexpr, SUB_TOKENS: tl.constexpr, BIG_VALUE: tl.constexpr):
    run = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    offs = run * SUB_TOKENS + tl.arange(0, SUB_TOKENS)
    inside = offs < seq_this
    pos = tl.load(THIS_POS + row * seq_this + offs, mask=inside, other=0)
    doc = tl.load(THIS_DOC + row * seq_this + offs, mask=inside, other=0)
    a = tl.min(tl.where(inside, pos, BIG_VALUE), 0)  # the run's positions span [a, b]
    b = tl.max(tl.where(inside, pos, -BIG_VALUE), 0)
    doc_max = tl.max(tl.where(inside, doc, -BIG_VALUE), 0)  # -1 when the run is all padding
    doc_lo = tl.min(tl.where(inside & (doc != -1), doc, BIG_VALUE), 0)  # smallest real document
    single = (tl.min(tl.where(inside, doc, BIG_VALUE), 0) == doc_max) & (doc_max != -1)

    # Position bounds on the other side, inclusive (as triton_plan._position_bounds). A query
    # at p sees keys k <= p (causal) with |p - k| < window.
    w = window
    none = tl.zeros([], dtype=tl.int64) + BIG_VALUE
    may_lower, may_upper, full_lower, full_upper = -none, none, -none, none
    if QUERY_SIDE:  # keys seen by queries in [a, b]
        if HAS_WINDOW:
            may_lower, full_lower = a - w + 1, b - w + 1
            if not CAUSAL:
                may_upper, full_upper = b + w - 1, a + w - 1
        if CAUSAL:
            may_upper, full_upper = b, a
    else:  # queries that see keys in [a, b]
        if HAS_WINDOW:
            may_upper, full_upper = b + w - 1, a + w - 1
            if not CAUSAL:
                may_lower, full_lower = a - w + 1, b - w + 1
        if CAUSAL:
            may_lower, full_lower = a, b

    docs_sorted = tl.load(FLAGS + row * 2) != 0
    pos_sorted = tl.load(FLAGS + row * 2 + 1) != 0
    docs, positions = OTHER_DOCS + row * seq_other, OTHER_POS + row * seq_other
    may_lo, may_hi = _span(docs, positions, seq_other, doc_lo, doc_max, may_lower, may_upper, docs_sorted,
                           pos_sorted, STEPS)
    may_empty = (may_hi <= may_lo) | (doc_max == -1)
    full_lo, full_hi = _span(docs, positions, seq_other, doc_max, doc_max, full_lower, full_upper, docs_sorted,
                             pos_sorted, STEPS)
    # The documents' running max lets padding inside a document through: stop at the first one.
    pads = OTHER_PADS + row * (seq_other + 1)
    pads_at_lo = tl.load(pads + tl.minimum(full_lo, seq_other))
    full_hi = tl.minimum(full_hi, _search(pads, seq_other + 1, pads_at_lo + 1, False, STEPS) - 1)
    full_empty = (full_hi <= full_lo) | ~single | ~docs_sorted
    if CAUSAL or HAS_WINDOW:
        full_empty = full_empty | ~pos_sorted

    out = INFO + (row * num_runs + run) * 4
    tl.store(out, tl.where(may_empty, seq_other, may_lo))
    tl.store(out + 1, tl.where(may_empty, 0, may_hi))
    tl.store(out + 2, tl.where(full_empty, seq_other, full_lo))
    tl.store(out + 3, tl.where(full_empty, 0, full_hi))


PLAN_SPEC = (_plan_runs, None, None, None)


def side_info(this_pos, this_doc, other_pos, other_doc, causal, window, query_side):
    """(rows, runs, 4) int64 run summaries of one side, as ``plan`` computes them with torch ops."""
    rows, seq_this = this_pos.shape
    seq_other = other_pos.shape[1]
    num_runs = -(-seq_this // SUB)
    doc_cummax = other_doc.cummax(dim=1).values  # padding takes the previous doc: stays sorted
    is_pad = other_doc == PAD_DOC
    flags = torch.stack([((other_doc == doc_cummax) | is_pad).all(dim=1),
                         (other_pos[:, 1:] >= other_pos[:, :-1]).all(dim=1)], dim=1).to(torch.int32)
    pads_before = F.pad(is_pad.long().cumsum(1), (1, 0))
    info = torch.empty(rows, num_runs, INFO_FIELDS, dtype=torch.int64, device=this_pos.device)
    launch_grid(PLAN_SPEC, (num_runs, rows),
                [this_pos, this_doc, other_pos, doc_cummax, pads_before, flags, info, seq_this, seq_other,
                 num_runs, window or 0],
                dict(CAUSAL=bool(causal), HAS_WINDOW=window is not None, QUERY_SIDE=query_side,
                     STEPS=(seq_other + 1).bit_length() + 1, SUB_TOKENS=SUB, BIG_VALUE=BIG),
                interpret_mode(this_pos.device))
    return info

"""Which tiles a Triton attention program visits: coordinate summaries computed with torch ops.

For every run of ``SUB`` (16) tokens of each side the plan finds two token spans of the *other*
side: the span that may hold visible tokens (tokens outside it are never loaded) and the span
whose tokens are visible from every token of the run (those tiles skip the mask arithmetic).
A kernel program merges the runs of its tile (union of "may" spans, intersection of "full"
spans), so the plan does not depend on the block sizes the autotuner picks.

Searchsorted does the work, so the spans are exact when documents are non-decreasing (apart
from -1 padding) and positions non-decreasing, as every layout produces. An unsorted side falls
back to the whole side for "may" and to nothing for "full": slower, still exact. All of it
stays on the device, with no host sync: about 140 small ops per call, shared by a forward and
its backward when they go through ``TritonAttentionFunction``. GPU calls use the same plan as
one Triton kernel per side (``plan_kernel``, a dozen ops and two launches).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..mask import PAD_DOC, Coords, Mask, as_batched
from .consts import BIG, SUB
from .plan_kernel import side_info


class _Runs(NamedTuple):
    pos_min: torch.Tensor  # (rows, runs) each
    pos_max: torch.Tensor
    doc_lo: torch.Tensor  # smallest non-padding doc (BIG when the run is all padding)
    doc_max: torch.Tensor  # padding included: PAD_DOC when the run is all padding
    single_doc: torch.Tensor  # every token of the run is in one (non-padding) document


class _Side(NamedTuple):
    pos: torch.Tensor  # (rows, s) int64
    doc_cummax: torch.Tensor  # padding takes the previous doc, so it stays sorted
    docs_sorted: torch.Tensor  # (rows, 1) bool
    pos_sorted: torch.Tensor
    pads_before: torch.Tensor  # (rows, s + 1): padding tokens before each index


def _runs(pos: torch.Tensor, doc: torch.Tensor) -> _Runs:
    batch, seq = pos.shape
    num_runs = -(-seq // SUB)
    pad = num_runs * SUB - seq

    def split(x):  # pad the last run by repeating its final token: bounds unchanged
        return torch.cat([x, x[:, -1:].expand(-1, pad)], dim=1).view(batch, num_runs, SUB)

    p, d = split(pos), split(doc)
    doc_min, doc_max = d.amin(2), d.amax(2)
    doc_lo = torch.where(d == PAD_DOC, BIG, d).amin(2)
    return _Runs(p.amin(2), p.amax(2), doc_lo, doc_max, (doc_min == doc_max) & (doc_max != PAD_DOC))


def _side(pos: torch.Tensor, doc: torch.Tensor) -> _Side:
    cummax = doc.cummax(dim=1).values
    is_pad = doc == PAD_DOC
    return _Side(pos, cummax, ((doc == cummax) | is_pad).all(dim=1, keepdim=True),
                 (pos[:, 1:] >= pos[:, :-1]).all(dim=1, keepdim=True),
                 F.pad(is_pad.long().cumsum(1), (1, 0)))


def _span(other: _Side, doc_first, doc_last, lower, upper):
    """[lo, hi) of other-side tokens with doc in [doc_first, doc_last] and, where bounds are
    given, pos in [lower, upper]; plus whether that span is tight (the side is sorted)."""
    seq = other.pos.shape[1]
    lo = torch.where(other.docs_sorted, torch.searchsorted(other.doc_cummax, doc_first), 0)
    hi = torch.where(other.docs_sorted, torch.searchsorted(other.doc_cummax, doc_last, right=True), seq)
    tight = other.docs_sorted
    if lower is not None:
        lo = torch.maximum(lo, torch.where(other.pos_sorted, torch.searchsorted(other.pos, lower), 0))
    if upper is not None:
        hi = torch.minimum(hi, torch.where(other.pos_sorted, torch.searchsorted(other.pos, upper, right=True), seq))
    if lower is not None or upper is not None:
        tight = tight & other.pos_sorted
    return lo, hi, tight


def _empty_where(empty, lo, hi, seq):
    return torch.where(empty, seq, lo), torch.where(empty, 0, hi)


def _may_span(this: _Runs, other: _Side, lower, upper):
    """Other-side tokens that may be visible from some token of the run."""
    lo, hi, _ = _span(other, this.doc_lo, this.doc_max, lower, upper)
    return _empty_where((hi <= lo) | (this.doc_max == PAD_DOC), lo, hi, other.pos.shape[1])


def _full_span(this: _Runs, other: _Side, lower, upper):
    """Other-side tokens visible from every token of the run: the run lies in one document, the
    span in the same document, without padding, inside the position bounds; tight spans only."""
    doc = this.doc_max
    lo, hi, tight = _span(other, doc, doc, lower, upper)
    # doc_cummax lets padding inside the document through: stop the span at the first one.
    pads_at_lo = other.pads_before.gather(1, lo.clamp(max=other.pos.shape[1]))
    first_pad = torch.searchsorted(other.pads_before, pads_at_lo + 1) - 1
    hi = torch.minimum(hi, first_pad)
    empty = (hi <= lo) | ~this.single_doc | ~tight
    return _empty_where(empty, lo, hi, other.pos.shape[1])


def _position_bounds(runs: _Runs, causal: bool, window: int | None, query_side: bool):
    """Inclusive pos bounds (None: unbounded) on the other side: (may_lower, may_upper,
    full_lower, full_upper). A query at p sees keys k <= p (causal) with |p - k| < window."""
    a, b, w = runs.pos_min, runs.pos_max, window
    if query_side:  # keys seen by queries in [a, b]
        may = (None if w is None else a - w + 1, b if causal else (None if w is None else b + w - 1))
        full = (None if w is None else b - w + 1, a if causal else (None if w is None else a + w - 1))
    else:  # queries that see keys in [a, b]
        may = (a if causal else (None if w is None else a - w + 1), None if w is None else b + w - 1)
        full = (b if causal else (None if w is None else b - w + 1), None if w is None else a + w - 1)
    return (*may, *full)


def _side_info(this_pos, this_doc, other: _Side, causal, window, query_side) -> torch.Tensor:
    runs = _runs(this_pos, this_doc)
    may_lower, may_upper, full_lower, full_upper = _position_bounds(runs, causal, window, query_side)
    spans = (*_may_span(runs, other, may_lower, may_upper), *_full_span(runs, other, full_lower, full_upper))
    return torch.stack(spans, -1).contiguous()


def plan(q_coords: Coords, k_coords: Coords, mask: Mask, batch, device, use_kernel=False):
    """(q_pos, q_doc, k_pos, k_doc) as (1 or b, s) int32 (rebased, see ``_kernel_coords``) and
    the (1 or b, runs, 4) int64 run summaries of each side. ``use_kernel``: compute the
    summaries with the Triton kernel of ``plan_kernel`` (GPU calls) instead of torch ops."""
    causal, window = mask.causal, mask.window
    coords = [as_batched(c).to(device=device, dtype=torch.int64) for c in (*q_coords, *k_coords)]
    rows = max(c.shape[0] for c in coords)
    if rows not in (1, batch):
        raise ValueError(f"coordinates must be (s,) or (batch={batch}, s), got batch {rows}")
    q_pos, q_doc, k_pos, k_doc = (c.expand(rows, -1).contiguous() for c in coords)
    if q_pos.shape != q_doc.shape or k_pos.shape != k_doc.shape:
        raise ValueError("q_pos/q_doc and k_pos/k_doc must have matching shapes")
    if use_kernel:
        q_info = side_info(q_pos, q_doc, k_pos, k_doc, causal, window, query_side=True)
        k_info = side_info(k_pos, k_doc, q_pos, q_doc, causal, window, query_side=False)
    else:
        q_info = _side_info(q_pos, q_doc, _side(k_pos, k_doc), causal, window, query_side=True)
        k_info = _side_info(k_pos, k_doc, _side(q_pos, q_doc), causal, window, query_side=False)
    return (*_kernel_coords(q_pos, q_doc, k_pos, k_doc), q_info, k_info)


def _kernel_coords(q_pos, q_doc, k_pos, k_doc):
    """int32 coordinates for the kernels (half the registers of int64 in masked tiles), rebased
    per row on the device: the mask needs only position differences and document equality, and
    a block's span of positions and documents is far below 2**31 whatever their absolute size."""
    pos_base = torch.minimum(q_pos.amin(1, keepdim=True), k_pos.amin(1, keepdim=True))
    real = lambda doc: torch.where(doc == PAD_DOC, BIG, doc).amin(1, keepdim=True)  # noqa: E731
    doc_base = torch.minimum(real(q_doc), real(k_doc))
    doc_base = torch.where(doc_base == BIG, 0, doc_base)

    def rebase(pos, doc):
        doc = torch.where(doc == PAD_DOC, PAD_DOC, doc - doc_base)
        return (pos - pos_base).to(torch.int32).contiguous(), doc.to(torch.int32).contiguous()

    (q_pos, q_doc), (k_pos, k_doc) = rebase(q_pos, q_doc), rebase(k_pos, k_doc)
    return q_pos, q_doc, k_pos, k_doc


def coord_args(q_pos, k_pos, q_info, k_info) -> list[int]:
    """Batch strides of coordinates and summaries (0 when shared by the batch), run counts."""
    shared = q_pos.shape[0] == 1
    return [0 if shared else q_pos.stride(0), 0 if shared else k_pos.stride(0),
            0 if shared else q_info.stride(0), 0 if shared else k_info.stride(0),
            q_info.shape[1], k_info.shape[1]]

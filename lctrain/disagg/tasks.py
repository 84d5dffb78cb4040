"""Cut one worker's packed documents into core-attention tasks, and price them exactly.

A task is a chunk of one document's queries plus the keys those queries may
see, all in the worker's local token coordinates (token t of the worker's
packed sequence has position t; within a document these differences equal the
in-document ones, which is all the mask rule reads). Tasks are independent:
a server computes each exactly from its q/k/v slices alone, so they can be
moved, batched and cut freely. Cost = visible (query, key) pairs, the FLOP
count up to a constant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_CHUNK_TOKENS = 128  # below ~128 query rows attention kernels lose efficiency (one tile)


@dataclass(frozen=True, order=True)
class AttentionTask:
    """Queries [q_start, q_start + q_len) of document ``doc`` on ``worker`` and their keys."""

    worker: int
    doc: int  # index of the document in the worker's list of lengths
    q_start: int
    q_len: int
    kv_start: int
    kv_len: int
    doc_start: int  # the document's bounds: needed to cut the task again
    doc_len: int

    @property
    def q_end(self) -> int:
        return self.q_start + self.q_len

    @property
    def kv_end(self) -> int:
        return self.kv_start + self.kv_len


def kv_range(doc_start: int, doc_len: int, q_start: int, q_len: int, causal: bool,
             window: int | None) -> tuple[int, int]:
    """(kv_start, kv_len): the smallest key range holding every key the queries may see."""
    lo, hi = doc_start, (q_start + q_len if causal else doc_start + doc_len)
    if window is not None:
        lo = max(lo, q_start - window + 1)
        if not causal:
            hi = min(hi, q_start + q_len - 1 + window)
    return lo, hi - lo


def make_task(worker: int, doc: int, doc_start: int, doc_len: int, q_start: int, q_len: int,
              causal: bool, window: int | None) -> AttentionTask:
    kv_start, kv_len = kv_range(doc_start, doc_len, q_start, q_len, causal, window)
    return AttentionTask(worker, doc, q_start, q_len, kv_start, kv_len, doc_start, doc_len)


def make_tasks(doc_lengths: Sequence[int], worker: int, causal: bool = True, window: int | None = None,
               chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS) -> list[AttentionTask]:
    """Tasks of one worker: each document cut into query chunks of ``chunk_tokens``.

    ``chunk_tokens=None`` keeps every document whole (the scheduler then splits
    only what balance needs, which moves far fewer K/V bytes: each chunk of a
    causal document carries its own copy of the prefix keys). Trailing padding
    is not listed in ``doc_lengths`` and gets no task.
    """
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1 or None, got {chunk_tokens}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    tasks, doc_start = [], 0
    for doc, doc_len in enumerate(doc_lengths):
        if doc_len < 1:
            raise ValueError(f"document {doc} of worker {worker} has length {doc_len}; lengths must be >= 1")
        step = doc_len if chunk_tokens is None else chunk_tokens
        for q_start in range(doc_start, doc_start + doc_len, step):
            q_len = min(step, doc_start + doc_len - q_start)
            tasks.append(make_task(worker, doc, doc_start, doc_len, q_start, q_len, causal, window))
        doc_start += doc_len
    return tasks


def _sum_positive(first: int, end: int, const: int, slope: int) -> int:
    """sum over i in [first, end) of max(0, const + slope * i), slope in {-1, 0, 1}."""
    if slope == 1:
        first = max(first, -const)
    elif slope == -1:
        end = min(end, const + 1)
    if end <= first:
        return 0
    if slope == 0:
        return (end - first) * max(0, const)
    return (2 * const + slope * (first + end - 1)) * (end - first) // 2


def visible_pairs_in_ranges(q_start: int, q_len: int, kv_start: int, kv_len: int, causal: bool,
                            window: int | None) -> int:
    """Exact visible pairs of queries [q_start, +q_len) and keys [kv_start, +kv_len) of one document.

    Query i sees keys [max(kv_start, i - w + 1), min(kv_end - 1, i)] (causal) or
    [max(kv_start, i - w + 1), min(kv_end - 1, i + w - 1)] (not causal); the
    count is piecewise linear in i, so each linear piece sums in closed form.
    """
    kv_last = kv_start + kv_len - 1
    upper_offset = 0 if causal else (None if window is None else window - 1)  # upper = i + offset
    lower_offset = None if window is None else -(window - 1)  # lower = i + offset
    q_end = q_start + q_len
    cuts = {q_start, q_end}
    if upper_offset is not None:
        cuts.add(kv_last - upper_offset + 1)  # from here on the upper bound is kv_last
    if lower_offset is not None:
        cuts.add(kv_start - lower_offset)  # from here on the lower bound is i + offset
    points = sorted(c for c in cuts if q_start <= c <= q_end)
    total = 0
    for first, end in zip(points, points[1:]):
        up_linear = upper_offset is not None and first + upper_offset <= kv_last
        low_linear = lower_offset is not None and first + lower_offset >= kv_start
        const = ((upper_offset if up_linear else kv_last) - (lower_offset if low_linear else kv_start) + 1)
        total += _sum_positive(first, end, const, int(up_linear) - int(low_linear))
    return total


def task_cost(task: AttentionTask, causal: bool, window: int | None) -> int:
    """Visible (query, key) pairs of the task: causal without window, q*kv - q(q-1)/2."""
    return visible_pairs_in_ranges(task.q_start, task.q_len, task.kv_start, task.kv_len, causal, window)


def _cut_points(task: AttentionTask, min_chunk_tokens: int) -> range:
    first = task.doc_start + ((task.q_start - task.doc_start) // min_chunk_tokens + 1) * min_chunk_tokens
    return range(first, task.q_end, min_chunk_tokens)


def cut_to_cost(task: AttentionTask, max_cost: int, causal: bool, window: int | None, from_end: bool = False,
                min_chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[AttentionTask | None, AttentionTask]:
    """(piece, rest): the longest query prefix (or suffix, ``from_end``) costing <= ``max_cost``.

    piece is None when no cut on a ``min_chunk_tokens`` multiple gives one that cheap.
    """
    cuts = _cut_points(task, min_chunk_tokens)

    def pieces(cut: int) -> tuple[AttentionTask, AttentionTask]:
        head = make_task(task.worker, task.doc, task.doc_start, task.doc_len, task.q_start, cut - task.q_start,
                         causal, window)
        tail = make_task(task.worker, task.doc, task.doc_start, task.doc_len, cut, task.q_end - cut, causal, window)
        return (tail, head) if from_end else (head, tail)

    def fits(index: int) -> bool:
        return task_cost(pieces(cuts[index])[0], causal, window) <= max_cost

    # A prefix grows with the cut and a suffix shrinks: find the boundary of `fits` by bisection.
    lo, hi = 0, len(cuts)  # from the start: first index that does not fit; from the end: first that fits
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid) != from_end:
            lo = mid + 1
        else:
            hi = mid
    index = lo if from_end else lo - 1
    if not 0 <= index < len(cuts):
        return None, task
    return pieces(cuts[index])

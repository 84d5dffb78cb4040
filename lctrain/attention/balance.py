"""Per-rank work, bytes and messages of the context-parallel strategies, computed, not measured.

For a sequence of packed documents, a layout and P ranks this module says what each rank's
``AttentionCounters`` would report for one attention layer, without running a strategy:

- work: unmasked (query, key) token pairs (forward; the backward recomputes the same pairs);
- bytes and messages each rank sends, forward and backward, for a model shape.

Work starts from W[r, j], the visible pairs between the queries rank r holds and the keys rank
j holds (``work_matrix``). Each strategy reads W its own way (``strategy_work``):

  ring, allgather  row sum W[r, :]: the rank's queries meet every key once;
  ulysses          a head share of the whole sequence: total // P, plus one on the first
                   total % P ranks (even whatever the layout);
  usp (degree U)   a ring over R = P / U Ulysses groups of U consecutive ranks; at ring step i
                   group g meets the keys of group (g - i) mod R and each of its U ranks reports
                   its integer 1/U share of that step's pairs (as ``AttentionCounters.share_of``);
  tree             column sum W[:, j]: every rank computes all gathered queries against its
                   local keys, so the keys' placement sets the balance.

Counting is exact integer arithmetic: documents are contiguous runs of the sequence, so the keys
a query at position p may see are the positions in one interval (``visible_key_range``), and the
keys a rank holds in that interval are two binary searches away. Nothing is O(s^2).

Bytes follow ``lctrain.distributed.comm``'s convention (what this rank contributes to a
collective as a ring algorithm sends it); ``traffic_per_rank`` has the formulas. A step-time
planner can combine both figures with a device's compute rate and link bandwidths.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lctrain.attention.layouts import Layout
from lctrain.attention.strategies.ulysses import kv_replicas, usable_degrees
from lctrain_kernels.mask import CAUSAL, PAD_DOC, Mask

STRATEGIES = ("ring", "allgather", "ulysses", "usp", "tree")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
COORD_BYTES = 8  # token_pos and doc_ids travel as int64


# ----------------------------------------------------------------------------- documents


def one_document(seq_len: int) -> np.ndarray:
    """Document id of every token: one document spanning the sequence."""
    return np.zeros(seq_len, dtype=np.int64)


def lognormal_doc_lengths(seq_len: int, seed: int = 0, median: float = 256.0, sigma: float = 1.5) -> list[int]:
    """Deterministic log-normal document lengths that fill ``seq_len`` exactly (the last one cut)."""
    rng = np.random.default_rng(seed)
    lengths, total = [], 0
    while total < seq_len:
        n = max(1, int(round(rng.lognormal(mean=np.log(median), sigma=sigma))))
        lengths.append(min(n, seq_len - total))
        total += lengths[-1]
    return lengths


def docs_from_lengths(lengths: list[int]) -> np.ndarray:
    """Document id of every token of documents of these lengths packed in order."""
    return np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)


def doc_bounds(doc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and one-past-last position of each token's document (documents are contiguous runs)."""
    change = np.flatnonzero(np.diff(doc)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [doc.shape[0]]])
    run = np.repeat(np.arange(starts.shape[0]), ends - starts)
    return starts[run], ends[run]


# ----------------------------------------------------------------------------- visible pairs


def visible_key_range(q_pos: np.ndarray, doc: np.ndarray, mask: Mask = CAUSAL,
                      bounds: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive interval [lo, hi] of global key positions each query at ``q_pos`` may see.

    The rule of ``lctrain_kernels.mask.visible_mask`` for contiguous documents: same document,
    no padding, key not after the query when causal, distance below the window. Padding queries
    and queries that see nothing get hi < lo. ``bounds``: ``doc_bounds(doc)``, when the caller
    already has it.
    """
    start, end = doc_bounds(doc) if bounds is None else bounds
    lo, hi = start[q_pos], end[q_pos] - 1
    if mask.causal:
        hi = q_pos
    if mask.window is not None:
        lo = np.maximum(lo, q_pos - mask.window + 1)
        if not mask.causal:
            hi = np.minimum(hi, q_pos + mask.window - 1)
    hi = np.where(doc[q_pos] == PAD_DOC, lo - 1, hi)
    return lo, hi


def visible_pairs(q_pos: np.ndarray, k_pos: np.ndarray, doc: np.ndarray, mask: Mask = CAUSAL,
                  bounds=None) -> int:
    """Visible pairs between queries at ``q_pos`` and keys at increasing positions ``k_pos``;
    ``doc`` holds the document id of every position of the sequence."""
    lo, hi = visible_key_range(q_pos, doc, mask, bounds)
    count = np.searchsorted(k_pos, hi, side="right") - np.searchsorted(k_pos, lo, side="left")
    return int(np.where(hi >= lo, count, 0).sum())


def pairs_against_all_keys(q_pos: np.ndarray, doc: np.ndarray, mask: Mask = CAUSAL, bounds=None) -> int:
    """Visible pairs of the queries at ``q_pos`` against every key of the sequence: the interval's
    length, no search (fast enough for sequences of millions of tokens)."""
    lo, hi = visible_key_range(q_pos, doc, mask, bounds)
    return int(np.maximum(hi - lo + 1, 0).sum())


def work_matrix(layout: Layout, doc: np.ndarray, mask: Mask = CAUSAL) -> np.ndarray:
    """W[r, j] = visible pairs between the queries rank r holds and the keys rank j holds."""
    seq_len, cp = doc.shape[0], layout.cp_size
    shards = [layout.positions(seq_len, r).numpy() for r in range(cp)]
    bounds = doc_bounds(doc)
    return np.array([[visible_pairs(shards[r], shards[j], doc, mask, bounds) for j in range(cp)]
                     for r in range(cp)], dtype=np.int64)


# ----------------------------------------------------------------------------- work per strategy


def split_share(pairs: int, parts: int, index: int) -> int:
    """Integer share of ``pairs`` that part ``index`` of ``parts`` reports (head-sharded counters):
    the shares of all parts sum to ``pairs``."""
    return pairs // parts + int(index < pairs % parts)


@dataclass(frozen=True)
class RankWork:
    """Pairs each rank reports, and for the ring-stepped strategies the slowest rank's pairs at
    each ring step (None where there are no steps)."""

    per_rank: list[int]
    ring_step_max: list[int] | None = None

    @property
    def total(self) -> int:
        return sum(self.per_rank)

    @property
    def mean(self) -> float:
        return self.total / len(self.per_rank)

    @property
    def balance(self) -> float:
        """max/mean: how much slower the busiest rank is than a perfectly even split."""
        return max(self.per_rank) / self.mean

    @property
    def lockstep_over_mean(self) -> float | None:
        """Sum over ring steps of the slowest rank's work, over the mean work: the balance when
        every step waits for its slowest rank (transfers hidden)."""
        return None if self.ring_step_max is None else sum(self.ring_step_max) / self.mean


def _ring_work(w: np.ndarray, stepped: bool) -> RankWork:
    cp = w.shape[0]
    per_rank = [int(x) for x in w.sum(axis=1)]
    if not stepped:
        return RankWork(per_rank)
    # ring step i: rank r computes on the block of rank (r - i) mod P
    return RankWork(per_rank, [max(int(w[r, (r - i) % cp]) for r in range(cp)) for i in range(cp)])


def _usp_work(w: np.ndarray, ulysses_degree: int) -> RankWork:
    cp, u = w.shape[0], ulysses_degree
    groups = cp // u
    # pairs between the tokens of Ulysses group g (ranks g*U .. g*U+U-1) and those of group g'
    wg = w.reshape(groups, u, groups, u).sum(axis=(1, 3))
    per_step = [[split_share(int(wg[p // u, (p // u - i) % groups]), u, p % u) for p in range(cp)]
                for i in range(groups)]
    return RankWork([sum(step[p] for step in per_step) for p in range(cp)], [max(step) for step in per_step])


def strategy_work(strategy: str, w: np.ndarray, ulysses_degree: int = 2) -> RankWork:
    """Pairs each rank's counters report under ``strategy``, from ``w = work_matrix(...)``.
    ``ulysses_degree``: U of usp (ulysses runs at degree P)."""
    cp = w.shape[0]
    if strategy in ("ring", "allgather"):
        return _ring_work(w, stepped=strategy == "ring")
    if strategy == "ulysses":
        total = int(w.sum())
        return RankWork([split_share(total, cp, r) for r in range(cp)])
    if strategy == "usp":
        return _usp_work(w, ulysses_degree)
    if strategy == "tree":
        return RankWork([int(x) for x in w.sum(axis=0)])
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


# ----------------------------------------------------------------------------- traffic


@dataclass(frozen=True)
class ModelShape:
    """One attention layer's tensors: batch rows, query / K/V heads, head dim, q/K/V dtype name.
    lse, dK/dV and dq accumulate in fp32 (fp64 for fp64 inputs), as the kernels do."""

    batch: int = 1
    heads: int = 32
    h_kv: int = 8
    head_dim: int = 128
    dtype: str = "bf16"

    def __post_init__(self):
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.heads % self.h_kv:
            raise ValueError(f"heads ({self.heads}) must be a multiple of h_kv ({self.h_kv})")

    @property
    def acc_dtype(self) -> str:
        return "fp64" if self.dtype == "fp64" else "fp32"

    @property
    def elem_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def acc_bytes(self) -> int:
        return DTYPE_BYTES[self.acc_dtype]


@dataclass(frozen=True)
class Traffic:
    """Bytes and messages (communication operations) one rank sends per attention layer."""

    forward: int = 0
    backward: int = 0
    messages_forward: int = 0
    messages_backward: int = 0


def skip_reason(strategy: str, cp: int, shape: ModelShape, ulysses_degree: int = 2) -> str | None:
    """None when ``strategy`` runs on ``cp`` ranks with this shape, else why it cannot."""
    heads, h_kv = shape.heads, shape.h_kv
    if strategy == "ulysses" and cp not in usable_degrees(heads, h_kv):
        return f"ulysses degree {cp} not usable for h={heads}, h_kv={h_kv}"
    if strategy == "usp":
        if cp % ulysses_degree or cp == ulysses_degree:
            return f"usp needs U={ulysses_degree} dividing P and P > U"
        if ulysses_degree not in usable_degrees(heads, h_kv):
            return f"usp Ulysses degree {ulysses_degree} not usable for h={heads}, h_kv={h_kv}"
    return None


def ring_bytes(ranks: int, tokens: int, kv_heads: int, shape: ModelShape) -> tuple[int, int]:
    """A ring of ``ranks`` over blocks of ``tokens`` tokens and ``kv_heads`` K/V heads: forward
    (P-1) (K/V + coords); backward the same K/V again plus P fp32 dK/dV accumulators."""
    b, d = shape.batch, shape.head_dim
    kv = 2 * b * tokens * kv_heads * d * shape.elem_bytes
    coords = 2 * b * tokens * COORD_BYTES
    acc = 2 * b * tokens * kv_heads * d * shape.acc_bytes
    forward = (ranks - 1) * (kv + coords)
    return forward, forward + ranks * acc


def ulysses_bytes(ranks: int, local: int, shape: ModelShape, grad_bytes: int) -> tuple[int, int]:
    """The Ulysses exchanges of ``ranks`` ranks: each all-to-all sends the P - 1 rows (of
    heads / P) that leave the rank. Forward: coords all-gather, q/k/v, out, lse; backward:
    dout, then dq/dk/dv in ``grad_bytes`` per element. K/V heads are replicated P / h_kv times
    when P exceeds h_kv."""
    b, d, e, a = shape.batch, shape.head_dim, shape.elem_bytes, shape.acc_bytes
    heads = shape.heads // ranks
    kv_heads = shape.h_kv * kv_replicas(shape.h_kv, ranks) // ranks
    rows = (ranks - 1) * b * local  # tokens of the rows that leave this rank
    coords = (ranks - 1) * 2 * b * local * COORD_BYTES
    forward = coords + rows * d * (heads + 2 * kv_heads) * e + rows * heads * d * e + rows * heads * a
    backward = rows * heads * d * e + rows * d * (heads + 2 * kv_heads) * grad_bytes
    return forward, backward


def _tree_bytes(ranks: int, local: int, shape: ModelShape) -> tuple[int, int]:
    """Forward: all-gathers of coords and q, an all-reduce max of the gathered queries' lse and a
    reduce-scatter of (out, denominator); backward: all-gathers of (q, dout) and (lse, delta) and
    a reduce-scatter of dq. Independent of ``query_chunk``."""
    b, h, d, e, a = shape.batch, shape.heads, shape.head_dim, shape.elem_bytes, shape.acc_bytes
    coords = 2 * b * local * COORD_BYTES
    lse_all_reduce = 2 * b * h * local * a  # 2 (P-1)/P of P local shards' lse
    forward = (ranks - 1) * (coords + b * local * h * d * e + lse_all_reduce + b * local * h * (d + 1) * a)
    backward = (ranks - 1) * (2 * b * local * h * d * e + lse_all_reduce + b * local * h * d * a)
    return forward, backward


def traffic_per_rank(strategy: str, cp: int, seq_len: int, shape: ModelShape, ulysses_degree: int = 2) -> Traffic:
    """Bytes and messages one rank sends per attention layer, as the strategy's counters count them.

    s = seq_len / P local tokens, b batch, h query heads, k = h_kv, d head_dim, e bytes of a
    q/K/V element, a of an accumulator element (fp32; fp64 for fp64); coordinates are int64 pos
    and doc, one row per batch row: C = 16 b s. K/V shard = 2 b s k d e; dK/dV = 2 b s k d a.

    ring      fwd: (P-1) (K/V + C)                                      msgs P-1
              bwd: (P-1) (K/V + C) + P dK/dV                            msgs 2P-1
    allgather fwd: (P-1) (K/V + C)            [2 all-gathers]           msgs 2
              bwd: (P-1) K/V + (P-1) dK/dV    [all-gather + reduce-scatter share]   msgs 2
    ulysses   kr = k x replicas (P / k when P > k), all-to-alls send (P-1)/P of the buffer:
              fwd: (P-1) C + (P-1)/P b s d [(h + 2 kr) e + h e] + (P-1)/P b s h a
                   [coords all-gather; q/k/v; out; lse]                 msgs 4
              bwd: (P-1)/P b s d [h e + (h + 2 kr) a]  [dout; dq/dk/dv] msgs 2
    usp       U = Ulysses degree, R = P / U, kr = k x replicas(U): the Ulysses exchanges at
              degree U, plus a ring over R groups on head shards of U s tokens (K/V block
              2 b U s kr/U d e, coords 16 b U s); the Ulysses backward returns q/k/v
              gradients in e bytes, not a                           msgs R+3 / 2R+1
    tree      fwd: (P-1) (C + b s h d e + 2 b h s a + b s h (d+1) a)
                   [coords, q all-gathers; lse all-reduce max; num/den reduce-scatter]   msgs 4
              bwd: (P-1) (2 b s h d e + 2 b h s a + b s h d a)
                   [q+dout, lse+delta all-gathers; dq reduce-scatter]   msgs 3
    """
    if cp == 1:
        return Traffic()
    local = seq_len // cp
    if strategy == "ring":
        return Traffic(*ring_bytes(cp, local, shape.h_kv, shape), cp - 1, 2 * cp - 1)
    if strategy == "allgather":
        forward, _ = ring_bytes(cp, local, shape.h_kv, shape)
        kv_and_grad = 2 * shape.batch * local * shape.h_kv * shape.head_dim * (shape.elem_bytes + shape.acc_bytes)
        return Traffic(forward, (cp - 1) * kv_and_grad, 2, 2)
    if strategy == "ulysses":
        return Traffic(*ulysses_bytes(cp, local, shape, shape.acc_bytes), 4, 2)
    if strategy == "usp":
        u, groups = ulysses_degree, cp // ulysses_degree
        kv_heads = shape.h_kv * kv_replicas(shape.h_kv, u) // u
        exchange = ulysses_bytes(u, local, shape, shape.elem_bytes)
        ring = ring_bytes(groups, u * local, kv_heads, shape)
        return Traffic(exchange[0] + ring[0], exchange[1] + ring[1], groups + 3, 2 * groups + 1)
    if strategy == "tree":
        return Traffic(*_tree_bytes(cp, local, shape), 4, 3)
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")

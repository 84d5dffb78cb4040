"""USP: Ulysses inside groups of consecutive ranks x ring attention across them.

The cp group of P = U x R ranks is factored by ``build_parallel_groups``: each
Ulysses group holds U consecutive ranks, each ring group the R ranks with the
same place in their Ulysses group. Forward:

1. Ulysses all-to-all inside the Ulysses group: the U sequence shards of q, k,
   v become head shards (this rank keeps h / U query heads for the U * s_local
   tokens of its group), and an all-gather brings those tokens' coordinates;
2. ring attention over the ring group on those head shards: R Ulysses groups
   hold disjoint token sets, so the ring visits every token once;
3. all-to-all back from head shards to this rank's sequence shard (out and lse).

Each exchange is its own autograd Function (backward = the reverse exchange of
the gradient) and the ring is ``RingAttentionFunction``, so autograd chains the
three exactly. Masking is by global coordinates, so any layout works; with the
striped layout every Ulysses group holds a stripe of the sequence and the ring
stays balanced.

Heads: the Ulysses degree U follows the rules of ``ulysses.py`` (h % U == 0;
K/V heads split, or replicated when U is a multiple of h_kv). Counters: the
exchanges record their collectives and bytes as in ``ulysses.py``, the ring
its hops and bytes as in ``ring.py``; ring pairs are token pairs computed for
h / U of the heads, so each rank reports its 1/U share (integer split across
the Ulysses group) and the cp group's sum stays the sequence's visible pairs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lctrain_kernels.mask import as_batched

from .allgather import group_size
from .counters import AttentionCounters
from .local_kernels import as_local_kernel
from .ring import RingAttentionFunction, _Ring
from .ulysses import (
    _Exchange,
    _heads_to_rows,
    _kv_replicas,
    _rows_to_heads,
    _rows_to_seq,
    _seq_to_rows,
    check_ulysses_inputs,
)


class _SeqToHeads(torch.autograd.Function):
    """Sequence shards (b, s, H, d) -> head shards (b, U * s, H / U, d), one packed all-to-all."""

    @staticmethod
    def forward(ctx, exchange: _Exchange, *xs):
        ctx.exchange, ctx.shapes = exchange, [x.shape for x in xs]
        return tuple(_to_heads(exchange, "forward", xs))

    @staticmethod
    def backward(ctx, *grads):
        return None, *_to_seq(ctx.exchange, "backward", grads, [s[1] for s in ctx.shapes])


class _HeadsToSeq(torch.autograd.Function):
    """Head shards (b, U * s, H / U, d) -> sequence shards (b, s, H, d)."""

    @staticmethod
    def forward(ctx, exchange: _Exchange, x):
        ctx.exchange = exchange
        seq = x.shape[1] // exchange.num_ranks
        return _to_seq(exchange, "forward", [x], [seq])[0]

    @staticmethod
    def backward(ctx, grad):
        return None, _to_heads(ctx.exchange, "backward", [grad])[0]


def _to_heads(exchange: _Exchange, phase: str, xs) -> list[torch.Tensor]:
    num_ranks = exchange.num_ranks
    rows = exchange.all_to_all(phase, *(_seq_to_rows(x.contiguous(), num_ranks) for x in xs))
    return [_rows_to_heads(r, x.shape[0], x.shape[1], x.shape[2] // num_ranks, x.shape[3])
            for r, x in zip(rows, xs)]


def _to_seq(exchange: _Exchange, phase: str, xs, seqs) -> list[torch.Tensor]:
    num_ranks = exchange.num_ranks
    rows = exchange.all_to_all(phase, *(_heads_to_rows(x.contiguous(), num_ranks) for x in xs))
    return [_rows_to_seq(r, x.shape[0], seq, x.shape[2], x.shape[3]) for r, x, seq in zip(rows, xs, seqs)]


class _PairShare:
    """Counters proxy that keeps this rank's 1/U share of the ring's pairs (see module doc)."""

    def __init__(self, counters: AttentionCounters, num_ranks: int, rank: int):
        self.counters, self.num_ranks, self.rank = counters, num_ranks, rank

    def add(self, phase: str, pairs: int = 0, bytes_sent: int = 0, messages: int = 0) -> None:
        share = pairs // self.num_ranks + int(self.rank < pairs % self.num_ranks)
        self.counters.add(phase, pairs=share, bytes_sent=bytes_sent, messages=messages)


def usp_attention(
    q, k, v, q_pos, q_doc, ulysses_group, ring_group, causal=True, window=None, scale=None,
    counters: AttentionCounters | None = None, kernel=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ulysses x ring attention on this rank's shards (same contract as ``ring_attention``).

    ``ulysses_group`` / ``ring_group``: this rank's subgroups of the cp group
    (``build_parallel_groups(..., ulysses_size=U).usp_groups``). Returns out
    (b, s_local, h, d) in q's dtype and lse (b, h, s_local) in fp32 (fp64 for
    fp64 inputs). Differentiable in q, k, v.
    """
    num_ulysses = group_size(ulysses_group)
    check_ulysses_inputs(q, k, v, q_pos, q_doc, window, num_ulysses)
    batch, seq, num_heads, _ = q.shape
    replicas = _kv_replicas(k.shape[2], num_ulysses)
    if replicas > 1:  # autograd sums the replicas' gradients back into each K/V head
        k, v = k.repeat_interleave(replicas, dim=2), v.repeat_interleave(replicas, dim=2)
    exchange = _Exchange(ulysses_group, num_ulysses, counters)
    coords = torch.stack(torch.broadcast_tensors(as_batched(q_pos.to(q.device)).long(),
                                                 as_batched(q_doc.to(q.device)).long()))
    pos, doc = exchange.all_gather("forward", coords)
    q_h, k_h, v_h = _SeqToHeads.apply(exchange, q, k, v)

    ulysses_rank = dist.get_rank(ulysses_group) if num_ulysses > 1 else 0
    ring = _Ring(ring_group, None if counters is None else _PairShare(counters, num_ulysses, ulysses_rank),
                 as_local_kernel(kernel, q))
    pos, doc = pos.expand(batch, -1).contiguous(), doc.expand(batch, -1).contiguous()
    out_h, lse_h = RingAttentionFunction.apply(q_h, k_h, v_h, pos, doc, ring, causal, window, scale)

    out = _HeadsToSeq.apply(exchange, out_h)
    heads_local = num_heads // num_ulysses
    lse_rows = lse_h.reshape(batch, heads_local, num_ulysses, seq).permute(2, 0, 1, 3).reshape(num_ulysses, -1)
    (lse_rows,) = exchange.all_to_all("forward", lse_rows)
    lse = lse_rows.view(num_ulysses, batch, heads_local, seq).permute(1, 0, 2, 3).reshape(batch, num_heads, seq)
    return out, lse.contiguous()

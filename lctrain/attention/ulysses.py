"""Ulysses context parallelism: all-to-all from sequence shards to head shards.

Every rank holds a shard of the sequence (any layout) with all heads. Forward:
one all-to-all turns the P sequence shards of q, k, v into head shards (rank r
keeps query heads [r * h / P, (r + 1) * h / P) and their K/V heads for *all*
P * s_local tokens), one all-gather brings every shard's global coordinates
(pos, doc), the local kernel attends the full sequence for those heads, and
all-to-alls of out and lse turn the result back into sequence shards. Masking
is by global coordinates, so the gathered token order (group-rank order) does
not matter and every layout works unchanged.

Heads: ``h`` must be divisible by P. K/V heads are split when ``h_kv % P == 0``;
when the degree exceeds the K/V heads (``P % h_kv == 0``) each K/V head is
replicated ``P / h_kv`` times for the exchange only (the one place lctrain
repeats K/V), so rank r receives K/V head ``r * h_kv // P``, the head of all
its query heads (query head i uses K/V head ``i // (h / h_kv)``). Backward sums
the replicas' dK/dV back into the original heads.

Backward: the head-sharded q, k, v, out and lse saved by the forward (each the
size of one local shard, so activation memory stays O(local)) feed the local
kernel with dout exchanged to head shards; dq, dk, dv (accumulation dtype:
fp32, fp64 for fp64 inputs) go back to sequence shards in one all-to-all.

Collective: ``dist.all_to_all_single`` with equal splits (gloo implements it on
CPU in torch 2.x, NCCL on GPU). Each tensor is laid out as (P, n) where row j
goes to (or came from) group rank j; tensors of one dtype are packed into one
call. Calls per attention on a group of P > 1 ranks:

- forward: 1 all-gather (coordinates) + 3 all-to-alls (q/k/v packed; out; lse);
- backward: 2 all-to-alls (dout; dq/dk/dv packed).

Counters (optional, per rank): ``messages`` = collective calls; ``bytes_sent``
= payload leaving this rank: an all-to-all of a (P, n) buffer sends (P - 1)
rows, an all-gather sends the local shard to P - 1 peers. ``pairs`` counts
(query, key) *token* pairs, like every other strategy, weighted by the share
of heads this rank computes: rank r holds h / P of the heads of every visible
pair of the full sequence, so it reports total // P, plus one on the first
``total % P`` ranks, which keeps the ranks' sum equal to the sequence's
visible pairs (comparable across strategies) and the balance exactly even.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lctrain_kernels.mask import as_batched

from .allgather import group_size
from .checks import check_shard_inputs
from .counters import count_visible_pairs, tensor_bytes
from .local_kernels import as_local_kernel


def usable_degrees(num_heads: int, num_kv_heads: int) -> list[int]:
    """Ulysses degrees P that work: P divides h, and P divides h_kv or h_kv divides P."""
    return [p for p in range(1, num_heads + 1)
            if num_heads % p == 0 and (num_kv_heads % p == 0 or p % num_kv_heads == 0)]


def check_ulysses_inputs(q, k, v, q_pos, q_doc, window, num_ranks: int) -> None:
    """Raise ValueError, naming the fix, before any collective is issued."""
    check_shard_inputs(q, k, v, q_pos, q_doc, window)
    num_heads, num_kv_heads = q.shape[2], k.shape[2]
    if num_heads % num_ranks != 0 or (num_kv_heads % num_ranks != 0 and num_ranks % num_kv_heads != 0):
        raise ValueError(
            f"Ulysses on {num_ranks} ranks needs the {num_heads} query heads divisible by the degree and "
            f"the {num_kv_heads} K/V heads divisible by it (or dividing it, to replicate K/V heads); "
            f"degrees that work for h={num_heads}, h_kv={num_kv_heads}: "
            f"{usable_degrees(num_heads, num_kv_heads)} (use ring/allgather or usp for other degrees)"
        )


def _kv_replicas(num_kv_heads: int, num_ranks: int) -> int:
    """How many times each K/V head is sent: 1 when split, P / h_kv when the degree exceeds h_kv."""
    return 1 if num_kv_heads % num_ranks == 0 else num_ranks // num_kv_heads


def _seq_to_rows(x_bshd: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """(b, s_local, H, d) -> (P, n): row j holds head slice j of the local tokens."""
    batch, seq, heads, dim = x_bshd.shape
    return x_bshd.reshape(batch, seq, num_ranks, heads // num_ranks, dim).permute(2, 0, 1, 3, 4).reshape(
        num_ranks, -1)


def _rows_to_heads(rows: torch.Tensor, batch: int, seq: int, heads_local: int, dim: int) -> torch.Tensor:
    """(P, n) received from every rank -> (b, P * s_local, H / P, d): all tokens, this rank's heads."""
    num_ranks = rows.shape[0]
    x = rows.view(num_ranks, batch, seq, heads_local, dim).permute(1, 0, 2, 3, 4)
    return x.reshape(batch, num_ranks * seq, heads_local, dim)


def _heads_to_rows(x_bshd: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """(b, P * s_local, H / P, d) -> (P, n): row j holds group rank j's tokens."""
    batch, seq_all, heads_local, dim = x_bshd.shape
    x = x_bshd.reshape(batch, num_ranks, seq_all // num_ranks, heads_local, dim).permute(1, 0, 2, 3, 4)
    return x.reshape(num_ranks, -1)


def _rows_to_seq(rows: torch.Tensor, batch: int, seq: int, heads_local: int, dim: int) -> torch.Tensor:
    """(P, n) received from every rank -> (b, s_local, H, d): local tokens, all heads."""
    num_ranks = rows.shape[0]
    x = rows.view(num_ranks, batch, seq, heads_local, dim).permute(1, 2, 0, 3, 4)
    return x.reshape(batch, seq, num_ranks * heads_local, dim)


class _Exchange:
    """All-to-all of (P, n) row buffers over the group, packing tensors of one dtype."""

    def __init__(self, group, num_ranks: int, counters):
        self.group, self.num_ranks, self.counters = group, num_ranks, counters

    def all_to_all(self, phase: str, *rows: torch.Tensor) -> list[torch.Tensor]:
        if self.num_ranks == 1:
            return list(rows)
        widths = [r.shape[1] for r in rows]
        send = torch.cat(rows, dim=1).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        if self.counters is not None:
            self.counters.add(phase, bytes_sent=(self.num_ranks - 1) * tensor_bytes(send[0]), messages=1)
        return list(recv.split(widths, dim=1))

    def all_gather(self, phase: str, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` concatenated along the last dim in group-rank order."""
        if self.num_ranks == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.num_ranks)]
        dist.all_gather(parts, x, group=self.group)
        if self.counters is not None:
            self.counters.add(phase, bytes_sent=(self.num_ranks - 1) * tensor_bytes(x), messages=1)
        return torch.cat(parts, dim=-1)


def _pair_share(group, num_ranks, pos, doc, causal, window, batch) -> int:
    """This rank's share of the visible token pairs of the full sequence (see module doc)."""
    total = count_visible_pairs(pos, pos, doc, doc, causal, window) * (batch // pos.shape[0])
    rank = dist.get_rank(group) if num_ranks > 1 else 0
    return total // num_ranks + int(rank < total % num_ranks)


class UlyssesAttentionFunction(torch.autograd.Function):
    """Autograd function: gradients flow through ``out``; ``lse`` is non-differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, q_pos, q_doc, group, causal, window, scale, counters, kernel):
        num_ranks = group_size(group)
        batch, seq, num_heads, dim = q.shape
        replicas = _kv_replicas(k.shape[2], num_ranks)
        if replicas > 1:  # the only place lctrain repeats K/V heads
            k, v = k.repeat_interleave(replicas, dim=2), v.repeat_interleave(replicas, dim=2)
        heads_local, kv_heads_local = num_heads // num_ranks, k.shape[2] // num_ranks
        exchange = _Exchange(group, num_ranks, counters)

        coords = torch.stack(torch.broadcast_tensors(as_batched(q_pos).long(), as_batched(q_doc).long()))
        pos, doc = exchange.all_gather("forward", coords)
        q_rows, k_rows, v_rows = exchange.all_to_all("forward", *(_seq_to_rows(x, num_ranks) for x in (q, k, v)))
        q_h = _rows_to_heads(q_rows, batch, seq, heads_local, dim)
        k_h = _rows_to_heads(k_rows, batch, seq, kv_heads_local, dim)
        v_h = _rows_to_heads(v_rows, batch, seq, kv_heads_local, dim)

        out_h, lse_h = kernel.forward(q_h, k_h, v_h, pos, pos, doc, doc, causal, window, scale)
        (out_rows,) = exchange.all_to_all("forward", _heads_to_rows(out_h, num_ranks))
        out = _rows_to_seq(out_rows, batch, seq, heads_local, dim)
        lse_rows = lse_h.view(batch, heads_local, num_ranks, seq).permute(2, 0, 1, 3).reshape(num_ranks, -1)
        (lse_rows,) = exchange.all_to_all("forward", lse_rows)
        lse = lse_rows.view(num_ranks, batch, heads_local, seq).permute(1, 0, 2, 3).reshape(batch, num_heads, seq)
        lse = lse.contiguous()
        if counters is not None:
            counters.add("forward", pairs=_pair_share(group, num_ranks, pos, doc, causal, window, batch))

        # Head shards are the size of the local shards: saving them keeps memory O(local)
        # and spares the backward re-exchanging q, k, v.
        ctx.save_for_backward(q_h, k_h, v_h, out_h, lse_h, pos, doc)
        ctx.settings = (group, num_ranks, replicas, causal, window, scale, counters, q.dtype, k.dtype, kernel)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q_h, k_h, v_h, out_h, lse_h, pos, doc = ctx.saved_tensors
        group, num_ranks, replicas, causal, window, scale, counters, q_dtype, kv_dtype, kernel = ctx.settings
        batch, seq, num_heads, dim = dout.shape
        heads_local, kv_heads_local = q_h.shape[2], k_h.shape[2]
        exchange = _Exchange(group, num_ranks, counters)

        (dout_rows,) = exchange.all_to_all("backward", _seq_to_rows(dout.to(q_dtype), num_ranks))
        dout_h = _rows_to_heads(dout_rows, batch, seq, heads_local, dim)
        dq_h, dk_h, dv_h = kernel.backward(
            dout_h, q_h, k_h, v_h, out_h, lse_h, pos, pos, doc, doc, causal, window, scale
        )
        dq_rows, dk_rows, dv_rows = exchange.all_to_all(
            "backward", *(_heads_to_rows(x, num_ranks) for x in (dq_h, dk_h, dv_h)))
        dq = _rows_to_seq(dq_rows, batch, seq, heads_local, dim)
        dk = _rows_to_seq(dk_rows, batch, seq, kv_heads_local, dim)
        dv = _rows_to_seq(dv_rows, batch, seq, kv_heads_local, dim)
        if replicas > 1:  # sum the replicas back into the original K/V heads (accumulation dtype)
            dk = dk.view(batch, seq, -1, replicas, dim).sum(dim=3)
            dv = dv.view(batch, seq, -1, replicas, dim).sum(dim=3)
        if counters is not None:
            counters.add("backward", pairs=_pair_share(group, num_ranks, pos, doc, causal, window, batch))
        return dq.to(q_dtype), dk.to(kv_dtype), dv.to(kv_dtype), *([None] * 8)


def ulysses_attention(
    q, k, v, q_pos, q_doc, group, causal=True, window=None, scale=None, counters=None, kernel=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ulysses (all-to-all) context-parallel attention on this rank's local shards.

    q (b, s_local, h, d), k/v (b, s_local, h_kv, d): the same local tokens;
    ``q_pos`` / ``q_doc``: their global positions and document ids, (s_local,)
    or (b, s_local) (the same form on every rank), doc -1 = padding. ``group``:
    the context-parallel process group (None = the default group, or a single
    rank when torch.distributed is not initialised); h must be divisible by its
    size P, and h_kv divisible by P or dividing P. Returns out (b, s_local, h, d)
    in q's dtype and lse (b, h, s_local) in fp32 (fp64 for fp64 inputs), -inf
    for rows that see no key. Differentiable in q, k, v. ``counters``: an
    AttentionCounters; ``kernel``: the local kernel ("torch", "triton", "auto").
    """
    check_ulysses_inputs(q, k, v, q_pos, q_doc, window, group_size(group))
    q_pos, q_doc = q_pos.to(q.device), q_doc.to(q.device)
    return UlyssesAttentionFunction.apply(q, k, v, q_pos, q_doc, group, causal, window, scale, counters,
                                          as_local_kernel(kernel, q))

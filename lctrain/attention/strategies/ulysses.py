"""Ulysses context parallelism: all-to-all from sequence shards to head shards.

Every rank holds a shard of the sequence (any layout) with all heads. Forward:
one all-to-all turns the P sequence shards of q, k, v into head shards (rank r
keeps query heads [r * h / P, (r + 1) * h / P) and their K/V heads for *all*
P * s_local tokens), one all-gather brings every shard's global coordinates,
the local kernel attends the full sequence for those heads, and all-to-alls of
out and lse turn the result back into sequence shards. Masking is by global
coordinates, so the gathered token order (group-rank order) does not matter
and every layout works unchanged.

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

``pairs`` counts (query, key) *token* pairs, like every other strategy,
weighted by the share of heads this rank computes: rank r holds h / P of the
heads of every visible pair of the full sequence, so it reports total // P,
plus one on the first ``total % P`` ranks, which keeps the ranks' sum equal to
the sequence's visible pairs and the balance exactly even.

The exchanges (``seq_to_heads``, ``heads_to_seq``, ``lse_to_seq``, with autograd
Functions ``SeqToHeads`` / ``HeadsToSeq``) are public: usp composes them with
the ring.
"""

from __future__ import annotations

import torch

from lctrain.distributed.comm import GroupComm, group_size
from lctrain_kernels.mask import CAUSAL, Coords, Mask

from ..checks import check_shard_inputs, shard_coords
from ..local_kernels import LocalKernel, as_local_kernel
from .base import Strategy, register


def usable_degrees(num_heads: int, num_kv_heads: int) -> list[int]:
    """Ulysses degrees P that work: P divides h, and P divides h_kv or h_kv divides P."""
    return [p for p in range(1, num_heads + 1)
            if num_heads % p == 0 and (num_kv_heads % p == 0 or p % num_kv_heads == 0)]


def check_ulysses_inputs(q, k, v, coords: Coords, num_ranks: int) -> None:
    """Raise ValueError, naming the fix, before any collective is issued."""
    check_shard_inputs(q, k, v, coords)
    num_heads, num_kv_heads = q.shape[2], k.shape[2]
    if num_ranks not in usable_degrees(num_heads, num_kv_heads):
        raise ValueError(
            f"Ulysses on {num_ranks} ranks needs the {num_heads} query heads divisible by the degree and "
            f"the {num_kv_heads} K/V heads divisible by it (or dividing it, to replicate K/V heads); "
            f"degrees that work for h={num_heads}, h_kv={num_kv_heads}: "
            f"{usable_degrees(num_heads, num_kv_heads)} (use ring/allgather or usp for other degrees)"
        )


def kv_replicas(num_kv_heads: int, num_ranks: int) -> int:
    """How many times each K/V head is sent: 1 when split, P / h_kv when the degree exceeds h_kv."""
    return 1 if num_kv_heads % num_ranks == 0 else num_ranks // num_kv_heads


# ----------------------------------------------------------------------- layouts of the exchange
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


def seq_to_heads(xs, comm: GroupComm, phase: str) -> list[torch.Tensor]:
    """Sequence shards (b, s, H, d) -> head shards (b, P * s, H / P, d), one packed all-to-all."""
    num_ranks = comm.size
    rows = comm.all_to_all([_seq_to_rows(x.contiguous(), num_ranks) for x in xs], phase)
    return [_rows_to_heads(r, x.shape[0], x.shape[1], x.shape[2] // num_ranks, x.shape[3])
            for r, x in zip(rows, xs)]


def heads_to_seq(xs, comm: GroupComm, phase: str) -> list[torch.Tensor]:
    """Head shards (b, P * s, H / P, d) -> sequence shards (b, s, H, d), one packed all-to-all."""
    num_ranks = comm.size
    rows = comm.all_to_all([_heads_to_rows(x.contiguous(), num_ranks) for x in xs], phase)
    return [_rows_to_seq(r, x.shape[0], x.shape[1] // num_ranks, x.shape[2], x.shape[3]) for r, x in zip(rows, xs)]


def lse_to_seq(lse_h: torch.Tensor, comm: GroupComm, phase: str) -> torch.Tensor:
    """lse of head shards (b, H / P, P * s) -> this rank's tokens, all heads (b, H, s)."""
    num_ranks = comm.size
    batch, heads_local, seq_all = lse_h.shape
    seq = seq_all // num_ranks
    rows = lse_h.reshape(batch, heads_local, num_ranks, seq).permute(2, 0, 1, 3).reshape(num_ranks, -1)
    (rows,) = comm.all_to_all([rows], phase)
    lse = rows.view(num_ranks, batch, heads_local, seq).permute(1, 0, 2, 3)
    return lse.reshape(batch, num_ranks * heads_local, seq).contiguous()


def gather_coords(coords: Coords, comm: GroupComm) -> Coords:
    """Every rank's coordinates in group-rank order: those of the tokens of a head shard."""
    return Coords.unstack(comm.all_gather(torch.stack(coords), dim=-1, phase="forward"))


def sum_replicas(dkv: torch.Tensor, replicas: int) -> torch.Tensor:
    """dK/dV of replicated K/V heads (b, s, h_kv * replicas, d) summed back into the h_kv heads."""
    if replicas == 1:
        return dkv
    batch, seq, _, dim = dkv.shape
    return dkv.view(batch, seq, -1, replicas, dim).sum(dim=3)


class SeqToHeads(torch.autograd.Function):
    """``seq_to_heads`` with the reverse exchange of the gradients as backward."""

    @staticmethod
    def forward(ctx, comm: GroupComm, *xs):
        ctx.comm = comm
        return tuple(seq_to_heads(xs, comm, "forward"))

    @staticmethod
    def backward(ctx, *grads):
        return None, *heads_to_seq(grads, ctx.comm, "backward")


class HeadsToSeq(torch.autograd.Function):
    """``heads_to_seq`` of one tensor with the reverse exchange as backward."""

    @staticmethod
    def forward(ctx, comm: GroupComm, x):
        ctx.comm = comm
        return heads_to_seq([x], comm, "forward")[0]

    @staticmethod
    def backward(ctx, grad):
        return None, seq_to_heads([grad], ctx.comm, "backward")[0]


# ------------------------------------------------------------------------------- the strategy
def ulysses_forward(q, k, v, coords: Coords, comm: GroupComm, mask: Mask, scale, kernel: LocalKernel):
    """(out, lse) of the local tokens and the head shards the backward needs."""
    replicas = kv_replicas(k.shape[2], comm.size)
    if replicas > 1:  # the only place lctrain repeats K/V heads
        k, v = k.repeat_interleave(replicas, dim=2), v.repeat_interleave(replicas, dim=2)
    all_coords = gather_coords(coords, comm)
    q_h, k_h, v_h = seq_to_heads([q, k, v], comm, "forward")
    out_h, lse_h = kernel.forward(q_h, k_h, v_h, all_coords, all_coords, mask, scale)
    out = heads_to_seq([out_h], comm, "forward")[0]
    lse = lse_to_seq(lse_h, comm, "forward")
    comm.count_pairs("forward", all_coords, all_coords, mask, q.shape[0], share=(comm.rank, comm.size))
    return out, lse, (q_h, k_h, v_h, out_h, lse_h, all_coords)


def ulysses_backward(dout, heads, comm: GroupComm, mask: Mask, scale, kernel: LocalKernel, replicas: int):
    """(dq, dk, dv) of the local tokens from the saved head shards."""
    q_h, k_h, v_h, out_h, lse_h, all_coords = heads
    (dout_h,) = seq_to_heads([dout.to(q_h.dtype)], comm, "backward")
    dq_h, dk_h, dv_h = kernel.backward(dout_h, q_h, k_h, v_h, out_h, lse_h, all_coords, all_coords, mask, scale)
    dq, dk, dv = heads_to_seq([dq_h, dk_h, dv_h], comm, "backward")
    comm.count_pairs("backward", all_coords, all_coords, mask, dout.shape[0], share=(comm.rank, comm.size))
    return dq, sum_replicas(dk, replicas), sum_replicas(dv, replicas)


class UlyssesAttentionFunction(torch.autograd.Function):
    """Autograd function: gradients flow through ``out``; ``lse`` is non-differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, coords, comm, mask, scale, kernel):
        out, lse, (q_h, k_h, v_h, out_h, lse_h, all_coords) = ulysses_forward(q, k, v, coords, comm, mask, scale,
                                                                                kernel)
        # Head shards are the size of the local shards: saving them keeps memory O(local)
        # and spares the backward re-exchanging q, k, v.
        ctx.save_for_backward(q_h, k_h, v_h, out_h, lse_h, *all_coords)
        ctx.settings = (comm, mask, scale, kernel, kv_replicas(k.shape[2], comm.size), q.dtype, k.dtype)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q_h, k_h, v_h, out_h, lse_h, pos, doc = ctx.saved_tensors
        comm, mask, scale, kernel, replicas, q_dtype, kv_dtype = ctx.settings
        heads = (q_h, k_h, v_h, out_h, lse_h, Coords(pos, doc))
        dq, dk, dv = ulysses_backward(dout, heads, comm, mask, scale, kernel, replicas)
        return dq.to(q_dtype), dk.to(kv_dtype), dv.to(kv_dtype), *([None] * 5)


def ulysses_attention(q, k, v, coords: Coords, group=None, mask: Mask = CAUSAL, scale=None, counters=None,
                      kernel: LocalKernel | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ulysses (all-to-all) context-parallel attention on this rank's local shards.

    Same contract as ``ring_attention`` (coordinates of the same form on every rank); h
    must be divisible by the group size P, and h_kv divisible by P or dividing P.
    """
    check_ulysses_inputs(q, k, v, coords, group_size(group))
    return UlyssesAttentionFunction.apply(q, k, v, shard_coords(q, coords), GroupComm(group, counters), mask,
                                          scale, as_local_kernel(kernel, q))


def check_heads(cfg, degree: int) -> None:
    """The model's heads split ``degree`` ways (config-time form of ``check_ulysses_inputs``)."""
    m = cfg.model
    if degree not in usable_degrees(m.num_heads, m.num_kv_heads):
        raise ValueError(
            f"cp={cfg.cp.strategy} splits heads {degree} ways: model.num_heads ({m.num_heads}) must divide by "
            f"it and model.num_kv_heads ({m.num_kv_heads}) divide it or by it; Ulysses degrees that work: "
            f"{usable_degrees(m.num_heads, m.num_kv_heads)} (or use cp=striped)"
        )


@register
class UlyssesStrategy(Strategy):
    name = "ulysses"

    def validate(self, cfg, world_size: int) -> int:
        dp = super().validate(cfg, world_size)
        check_heads(cfg, cfg.cp.size)
        return dp

    def attend(self, group, layout, **options):
        return lambda q, k, v, coords, mask, scale, counters, kernel: ulysses_attention(
            q, k, v, coords, group, mask, scale, counters, kernel)

"""Tree attention: queries travel, K/V stay; partial results combine with tree collectives.

Each of the P ranks holds one shard of the sequence (any layout: masking is by
global coordinates, so gathered queries carry their ``Coords``). Every
rank serves the queries of *every* rank against its own local K/V, and the
softmax over the sequence axis, being an associative log-sum-exp reduction
(Tree Attention, Shyam et al.), is finished with collectives that NCCL and
gloo run as trees or rings.

The local queries are processed in chunks of at most ``query_chunk`` tokens per
rank (None: one chunk), so a rank holds at most P * query_chunk gathered
query tokens at once. All ranks hold shards of the same length, hence the same
chunks.

Forward. Once per call: all-gather the coordinates (pos, doc) of every rank.
Per chunk of c tokens per rank:

1. all-gather the chunk's queries -> (b, P * c, h, d) in group-rank order;
2. local kernel: partial (out_r, lse_r) of those queries against local K/V;
3. all-reduce MAX of lse_r -> m, the same reference on every rank (a row
   that sees no key anywhere has m = -inf; it is shifted by 0 instead);
4. reduce-scatter SUM of [exp(lse_r - m) * out_r, exp(lse_r - m)] packed as
   (b, P * c, h, d + 1) in fp32 (fp64 for fp64 inputs): each owner receives
   the numerator and denominator of its own c tokens only, and finishes
   out = num / den, lse = m + log(den) (out 0 and lse -inf where den = 0).

Backward, per chunk, from the final (merged) lse and delta = rowsum(dout * out)
of the owner: all-gather [q, dout] (packed along heads) and [lse, delta]; the
local kernel gives dq for all gathered queries and dK/dV for the local keys
(summed locally over chunks, fp32/fp64); a reduce-scatter SUM returns to each
owner the dq of its own tokens. ``out`` itself never travels: delta replaces it.

Counters (optional, per rank): ``pairs`` = unmasked (query, key) pairs the
local kernel computed (all gathered queries x local keys), summed over batch
rows, per phase; ``messages`` = collective calls; ``bytes_sent`` follows
``lctrain.distributed.comm``'s convention. With
n = ceil(s / query_chunk) chunks, e / a the bytes of one input / accumulation
element, r the coordinate rows (1 or b):

- forward:  messages 1 + 3n; bytes (P - 1) * (16 r s + b s h d e + 2 b h s a
            + b s h (d + 1) a);
- backward: messages 3n; bytes (P - 1) * (2 b s h d e + 2 b h s a + b s h d a).

Bytes do not depend on the chunking, only messages do. P == 1 (no group, or a
group of one rank) is the local kernel: no messages, no chunking. All ranks
must pass shards of the same shape (every layout does) and coordinates of the
same form ((s,) everywhere or (b, s) everywhere). Gathered queries sit in
group-rank order, so one kernel query tile may hold several ranks' tokens:
masking stays exact, but tile skipping is coarser than on a single shard.
"""

from __future__ import annotations

import torch

from lctrain.distributed.comm import GroupComm
from lctrain_kernels.mask import CAUSAL, Coords, Mask
from lctrain_kernels.reference import accumulation_dtype

from ..checks import check_shard_inputs, shard_coords
from ..local_kernels import LocalKernel, as_local_kernel
from .base import Strategy, register


def _chunks(seq_len: int, query_chunk: int | None) -> list[tuple[int, int]]:
    step = seq_len if query_chunk is None else query_chunk
    return [(start, min(start + step, seq_len)) for start in range(0, seq_len, max(step, 1))]


def _chunk_coords(coords_all: torch.Tensor, start: int, end: int) -> Coords:
    """(P, 2, rows, s) coordinates of every rank -> Coords (rows, P * (end - start)) of one chunk."""
    num_ranks, _, rows, _ = coords_all.shape
    chunk = coords_all[..., start:end].permute(1, 2, 0, 3)
    return Coords.unstack(chunk.reshape(2, rows, num_ranks * (end - start)))


def _combine(out_part, lse_part, comm: GroupComm, acc_dtype):
    """Exact (out, lse) of this rank's own tokens from every rank's partials over its keys:
    all-reduce MAX of lse, then one reduce-scatter SUM of numerator and denominator."""
    lse_max = comm.all_reduce(lse_part.clone(memory_format=torch.contiguous_format), "forward",
                              op=torch.distributed.ReduceOp.MAX)  # (b, h, P * c)
    # Rows that see no key anywhere keep max -inf: shift them by 0 so the
    # weights are exp(-inf) = 0 rather than exp(-inf - -inf) = NaN.
    shift = torch.where(lse_max == float("-inf"), 0.0, lse_max)
    weight = torch.exp(lse_part - shift).transpose(1, 2).unsqueeze(-1)  # (b, P * c, h, 1)
    packed = torch.cat([out_part.to(acc_dtype) * weight, weight], dim=-1)
    mine = comm.reduce_scatter(packed, dim=1, phase="forward")  # (b, c, h, d + 1): own tokens
    num, den = mine[..., :-1], mine[..., -1]
    seen = den > 0
    out = num / torch.where(seen, den, 1.0).unsqueeze(-1)
    own_shift = shift.chunk(comm.size, dim=-1)[comm.rank]
    own_lse = torch.where(seen, torch.log(torch.where(seen, den, 1.0)), float("-inf"))
    return out, own_shift + own_lse.transpose(1, 2)


def tree_forward(q, k, v, coords: Coords, comm: GroupComm, mask: Mask, scale, kernel: LocalKernel,
                 query_chunk: int | None):
    """(out, lse, every rank's coordinates (P, 2, rows, s) or None when P == 1)."""
    batch = q.shape[0]
    if comm.size == 1:
        out, lse = kernel.forward(q, k, v, coords, coords, mask, scale)
        comm.count_pairs("forward", coords, coords, mask, batch)
        return out, lse, None
    acc_dtype = accumulation_dtype(q.dtype)
    coords_all = comm.all_gather(torch.stack(coords).unsqueeze(0), dim=0, phase="forward")  # (P, 2, rows, s)
    out = q.new_empty(q.shape)
    lse = q.new_empty((batch, q.shape[2], q.shape[1]), dtype=acc_dtype)
    for start, end in _chunks(q.shape[1], query_chunk):
        q_all = comm.all_gather(q[:, start:end], dim=1, phase="forward")  # (b, P * c, h, d)
        chunk_coords = _chunk_coords(coords_all, start, end)
        out_part, lse_part = kernel.forward(q_all, k, v, chunk_coords, coords, mask, scale, out_dtype=acc_dtype)
        comm.count_pairs("forward", chunk_coords, coords, mask, batch)
        out_own, lse[:, :, start:end] = _combine(out_part, lse_part, comm, acc_dtype)
        out[:, start:end] = out_own.to(q.dtype)
    return out, lse, coords_all


def tree_backward(dout, q, k, v, out, lse, coords: Coords, coords_all, comm: GroupComm, mask: Mask, scale,
                  kernel: LocalKernel, query_chunk: int | None):
    """(dq, dk, dv) of the local shard: queries and dout gathered per chunk, dq reduce-scattered home."""
    batch, num_heads = q.shape[0], q.shape[2]
    if comm.size == 1:
        dq, dk, dv = kernel.backward(dout, q, k, v, out, lse, coords, coords, mask, scale)
        comm.count_pairs("backward", coords, coords, mask, batch)
        return dq, dk, dv
    acc_dtype = accumulation_dtype(q.dtype)
    delta = (dout.to(acc_dtype) * out.to(acc_dtype)).sum(dim=-1).transpose(1, 2)  # (b, h, s)
    dq = q.new_empty(q.shape, dtype=acc_dtype)
    dk = k.new_zeros(k.shape, dtype=acc_dtype)
    dv = v.new_zeros(v.shape, dtype=acc_dtype)
    for start, end in _chunks(q.shape[1], query_chunk):
        q_dout = torch.cat([q[:, start:end], dout[:, start:end].to(q.dtype)], dim=2)
        q_all, dout_all = comm.all_gather(q_dout, dim=1, phase="backward").split(num_heads, dim=2)
        stats = torch.stack([lse[:, :, start:end], delta[:, :, start:end]])  # (2, b, h, c)
        lse_all, delta_all = comm.all_gather(stats, dim=-1, phase="backward")
        chunk_coords = _chunk_coords(coords_all, start, end)
        dq_part, dk_part, dv_part = kernel.backward(dout_all, q_all, k, v, None, lse_all, chunk_coords, coords,
                                                    mask, scale, delta=delta_all)
        comm.count_pairs("backward", chunk_coords, coords, mask, batch)
        dk += dk_part
        dv += dv_part
        dq[:, start:end] = comm.reduce_scatter(dq_part, dim=1, phase="backward")
    return dq, dk, dv


class TreeAttentionFunction(torch.autograd.Function):
    """Differentiable tree attention over local shards; ``lse`` is non-differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, coords, comm, mask, scale, kernel, query_chunk):
        out, lse, coords_all = tree_forward(q, k, v, coords, comm, mask, scale, kernel, query_chunk)
        ctx.save_for_backward(q, k, v, out, lse, *coords, coords_all)
        ctx.settings = (comm, mask, scale, kernel, query_chunk)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, pos, doc, coords_all = ctx.saved_tensors
        dq, dk, dv = tree_backward(dout, q, k, v, out, lse, Coords(pos, doc), coords_all, *ctx.settings)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *([None] * 6)


def tree_peak_query_tokens(seq_local: int, num_ranks: int, query_chunk: int | None = None) -> int:
    """Gathered query tokens a rank holds at once: P x (tokens per chunk); the local shard if P == 1."""
    per_rank = seq_local if query_chunk is None else min(query_chunk, seq_local)
    return num_ranks * per_rank if num_ranks > 1 else seq_local


def check_query_chunk(query_chunk) -> None:
    if query_chunk is not None and (isinstance(query_chunk, bool) or not isinstance(query_chunk, int)
                                    or query_chunk < 1):
        raise ValueError(f"query_chunk must be a positive number of tokens or None, got {query_chunk!r}")


def tree_attention(q, k, v, coords: Coords, group=None, mask: Mask = CAUSAL, scale=None, counters=None,
                   kernel: LocalKernel | str | None = None, query_chunk: int | None = None):
    """Tree attention of this rank's shards. Returns (out (b, s_local, h, d), lse (b, h, s_local)).

    Same contract as ``ring_attention``; ``query_chunk``: most local query tokens per
    rank gathered at once (None: the whole shard), bounding peak memory at
    P x query_chunk gathered tokens.
    """
    check_shard_inputs(q, k, v, coords)
    check_query_chunk(query_chunk)
    return TreeAttentionFunction.apply(q, k, v, shard_coords(q, coords), GroupComm(group, counters), mask, scale,
                                       as_local_kernel(kernel, q), query_chunk)


@register
class TreeStrategy(Strategy):
    name = "tree"
    options = {"query_chunk": None}

    def config_options(self, cfg, groups) -> dict:
        return {"query_chunk": cfg.cp.query_chunk or None}

    def attend(self, group, layout, query_chunk=None):
        check_query_chunk(query_chunk)
        return lambda q, k, v, coords, mask, scale, counters, kernel: tree_attention(
            q, k, v, coords, group, mask, scale, counters, kernel, query_chunk)

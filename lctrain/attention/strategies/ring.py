"""Ring attention: K/V blocks travel around the context-parallel ring.

Each of the P ranks holds one shard of the sequence (any layout: masking is by
global coordinates, so a block carries its ``Coords`` with it).

Forward, P steps. At step i rank r holds the K/V block of rank (r - i) mod P.
Before computing on it, the rank posts the asynchronous transfer of that block
to rank r + 1 and the receive of the next block from rank r - 1 (double
buffering: compute on one buffer while the other fills), and waits after the
compute, so the transfer overlaps the work. Partial (out, lse) pairs are merged
in fp32 (fp64 for fp64 inputs) with ``merge_partials``.

Backward, P steps over the same blocks, recomputing probabilities from the
final merged lse and delta = rowsum(dout * out). dQ accumulates locally. The
dK/dV accumulator (fp32/fp64) of a block travels one hop behind its K/V: the
contribution computed at step i is added to the accumulator received from
rank r - 1 (posted at the end of step i - 1, so its transfer overlaps step i's
compute) and sent on to rank r + 1. After P hops the accumulator of every
block has visited every rank and arrives home.

Messages each rank sends (one message = one batched P2P transfer to rank
r + 1, carrying one packed payload tensor plus, for K/V, one coordinate tensor):

- forward:  P - 1 K/V blocks;
- backward: P - 1 K/V blocks + P dK/dV accumulators = 2P - 1.

P == 1 (no group, or a group of one rank) is the local kernel, no messages.
All ranks must pass shards of the same shape (every layout does) and
coordinates of the same form ((s,) everywhere or (b, s) everywhere).

Layering: ``ring_forward`` / ``ring_backward`` are plain functions (usp calls
them on head shards), ``RingAttentionFunction`` ties them into autograd and
``ring_attention`` is the public entry point.
"""

from __future__ import annotations

import torch

from lctrain.distributed.comm import GroupComm, wait
from lctrain_kernels.mask import CAUSAL, Coords, Mask
from lctrain_kernels.reference import accumulation_dtype

from ..checks import check_shard_inputs, shard_coords
from ..local_kernels import LocalKernel, as_local_kernel
from ..merge import merge_partials
from .base import Strategy, register


def ring_forward(q, k, v, coords: Coords, comm: GroupComm, mask: Mask, scale, kernel: LocalKernel):
    """(out in q's dtype, lse in the accumulation dtype) of the local queries over every rank's
    keys. ``coords``: the local tokens' (rows, s) coordinates (``shard_coords``)."""
    acc_dtype = accumulation_dtype(q.dtype)
    kv_cur, coord_cur = torch.stack([k, v]), torch.stack(coords)
    kv_spare, coord_spare = torch.empty_like(kv_cur), torch.empty_like(coord_cur)
    out = lse = None
    for step in range(comm.size):
        requests = []
        if step < comm.size - 1:  # prefetch the next block while computing this one
            requests = comm.ring_exchange([kv_cur, coord_cur], [kv_spare, coord_spare], "forward")
        k_coords = Coords.unstack(coord_cur)
        # Partials stay in the accumulation dtype until the last merge (no bf16 rounding).
        out_blk, lse_blk = kernel.forward(q, kv_cur[0], kv_cur[1], coords, k_coords, mask, scale,
                                          out_dtype=acc_dtype)
        comm.count_pairs("forward", coords, k_coords, mask, q.shape[0])
        if out is None:
            out, lse = out_blk.to(acc_dtype), lse_blk.to(acc_dtype)
        else:
            out, lse = merge_partials(out, lse, out_blk, lse_blk)
        wait(requests)
        kv_cur, kv_spare = kv_spare, kv_cur
        coord_cur, coord_spare = coord_spare, coord_cur
    return out.to(q.dtype), lse


def ring_backward(dout, q, k, v, out, lse, coords: Coords, comm: GroupComm, mask: Mask, scale,
                  kernel: LocalKernel):
    """(dq, dk, dv) of the local shard in the accumulation dtype, from the merged ``lse``."""
    acc_dtype = accumulation_dtype(q.dtype)
    delta = (dout.to(acc_dtype) * out.to(acc_dtype)).sum(dim=-1).transpose(1, 2)
    kv_cur, coord_cur = torch.stack([k, v]), torch.stack(coords)
    kv_spare, coord_spare = torch.empty_like(kv_cur), torch.empty_like(coord_cur)
    dq = q.new_zeros(q.shape, dtype=acc_dtype)
    dkv_requests, dkv_in = [], None
    for step in range(comm.size):
        kv_requests = []
        if step < comm.size - 1:
            kv_requests = comm.ring_exchange([kv_cur, coord_cur], [kv_spare, coord_spare], "backward")
        k_coords = Coords.unstack(coord_cur)
        dq_blk, dk_blk, dv_blk = kernel.backward(dout, q, kv_cur[0], kv_cur[1], out, lse, coords, k_coords, mask,
                                                 scale, delta=delta)
        comm.count_pairs("backward", coords, k_coords, mask, q.shape[0])
        dq += dq_blk
        dkv = torch.stack([dk_blk, dv_blk])
        if step > 0:  # the accumulator of this block, sent by rank - 1 at its previous step
            wait(dkv_requests)
            dkv += dkv_in
        if comm.size > 1:  # pass it on; at the last step this hop brings it home
            dkv_in = torch.empty_like(dkv)
            dkv_requests = comm.ring_exchange([dkv], [dkv_in], "backward")
        else:
            dkv_in = dkv
        wait(kv_requests)
        kv_cur, kv_spare = kv_spare, kv_cur
        coord_cur, coord_spare = coord_spare, coord_cur
    wait(dkv_requests)  # dkv_in now holds this rank's own dK/dV, summed over all ranks
    return dq, dkv_in[0], dkv_in[1]


class RingAttentionFunction(torch.autograd.Function):
    """Differentiable ring attention over local shards; ``lse`` is non-differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, coords, comm, mask, scale, kernel):
        out, lse = ring_forward(q, k, v, coords, comm, mask, scale, kernel)
        ctx.save_for_backward(q, k, v, out, lse, *coords)
        ctx.settings = (comm, mask, scale, kernel)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, pos, doc = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, Coords(pos, doc), *ctx.settings)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *([None] * 5)


def ring_attention(q, k, v, coords: Coords, group=None, mask: Mask = CAUSAL, scale=None, counters=None,
                   kernel: LocalKernel | str | None = None):
    """Ring attention of this rank's shards. Returns (out (b, s_local, h, d), lse (b, h, s_local)).

    q (b, s_local, h, d), k / v (b, s_local, h_kv, d) with h % h_kv == 0: this
    rank's tokens. ``coords``: their global coordinates, (s_local,) or (b, s_local)
    each; they describe the local K/V too (doc -1 marks padding). ``group``: the
    context-parallel process group (None: the default group, or no ring if
    torch.distributed is not initialised). ``counters`` (an ``AttentionCounters``)
    receives pairs, bytes and messages per phase. ``kernel``: the local kernel per
    block ("torch", "triton", "auto" or a LocalKernel). lse is float32 (float64 for
    float64 inputs), -inf on rows that see no key.
    """
    check_shard_inputs(q, k, v, coords)
    return RingAttentionFunction.apply(q, k, v, shard_coords(q, coords), GroupComm(group, counters), mask, scale,
                                       as_local_kernel(kernel, q))


@register
class RingStrategy(Strategy):
    """Ring attention over any layout: contiguous (Ring Attention), striped (Striped Attention), zigzag."""

    name = "ring"

    def attend(self, group, layout, **options):
        return lambda q, k, v, coords, mask, scale, counters, kernel: ring_attention(
            q, k, v, coords, group, mask, scale, counters, kernel)

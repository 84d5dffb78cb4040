"""Ring attention: K/V blocks travel around the context-parallel ring.

Each of the P ranks holds one shard of the sequence (any layout: masking is by
global coordinates, so a block carries its ``pos`` / ``doc`` with it).

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
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lctrain_kernels.reference import accumulation_dtype

from .checks import check_shard_inputs, shard_coords
from .counters import AttentionCounters, tensor_bytes
from .local_kernels import LocalKernel, as_local_kernel
from .place import GroupPlace
from .merge import merge_partials


class _Ring(GroupPlace):
    """This rank's place in the ring: size, neighbours (as global ranks) and counters."""

    def __init__(self, group, counters: AttentionCounters | None, kernel: LocalKernel | None = None):
        super().__init__(group, counters, kernel)
        if self.size > 1:
            self.next = dist.get_global_rank(self.group, (self.rank + 1) % self.size)
            self.prev = dist.get_global_rank(self.group, (self.rank - 1) % self.size)

    def exchange(self, phase: str, send: list[torch.Tensor], recv: list[torch.Tensor]):
        """Post sends to rank + 1 and receives from rank - 1; returns the requests to wait on."""
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in send]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in recv]
        if self.counters is not None:
            self.counters.add(phase, bytes_sent=tensor_bytes(*send), messages=1)
        return dist.batch_isend_irecv(ops)



def _wait(requests) -> None:
    for request in requests:
        request.wait()


def _pack_kv(k, v, pos, doc):
    """One payload tensor (2, b, s, h_kv, d) and one coordinate tensor (2, 1 or b, s)."""
    return torch.stack([k, v]), torch.stack([pos, doc])


class RingAttentionFunction(torch.autograd.Function):
    """Differentiable ring attention over local shards; ``lse`` is non-differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, q_pos, q_doc, ring, causal, window, scale):
        acc_dtype = accumulation_dtype(q.dtype)
        kv_cur, coord_cur = _pack_kv(k, v, q_pos, q_doc)
        kv_spare, coord_spare = torch.empty_like(kv_cur), torch.empty_like(coord_cur)
        out = lse = None
        for step in range(ring.size):
            requests = []
            if step < ring.size - 1:  # prefetch the next block while computing this one
                requests = ring.exchange("forward", [kv_cur, coord_cur], [kv_spare, coord_spare])
            k_pos, k_doc = coord_cur[0], coord_cur[1]
            # Partials stay in the accumulation dtype until the last merge (no bf16 rounding).
            out_blk, lse_blk = ring.kernel.forward(
                q, kv_cur[0], kv_cur[1], q_pos, k_pos, q_doc, k_doc, causal, window, scale, out_dtype=acc_dtype
            )
            ring.count_pairs("forward", q_pos, k_pos, q_doc, k_doc, causal, window, q.shape[0])
            if out is None:
                out, lse = out_blk.to(acc_dtype), lse_blk.to(acc_dtype)
            else:
                out, lse = merge_partials(out, lse, out_blk, lse_blk)
            _wait(requests)
            kv_cur, kv_spare = kv_spare, kv_cur
            coord_cur, coord_spare = coord_spare, coord_cur

        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, q_pos, q_doc)
        ctx.settings = (ring, causal, window, scale)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, q_pos, q_doc = ctx.saved_tensors
        ring, causal, window, scale = ctx.settings
        acc_dtype = accumulation_dtype(q.dtype)
        delta = (dout.to(acc_dtype) * out.to(acc_dtype)).sum(dim=-1).transpose(1, 2)
        kv_cur, coord_cur = _pack_kv(k, v, q_pos, q_doc)
        kv_spare, coord_spare = torch.empty_like(kv_cur), torch.empty_like(coord_cur)
        dq = q.new_zeros(q.shape, dtype=acc_dtype)
        dkv_requests, dkv_in = [], None
        for step in range(ring.size):
            kv_requests = []
            if step < ring.size - 1:
                kv_requests = ring.exchange("backward", [kv_cur, coord_cur], [kv_spare, coord_spare])
            k_pos, k_doc = coord_cur[0], coord_cur[1]
            dq_blk, dk_blk, dv_blk = ring.kernel.backward(
                dout, q, kv_cur[0], kv_cur[1], out, lse, q_pos, k_pos, q_doc, k_doc,
                causal, window, scale, delta=delta,
            )
            ring.count_pairs("backward", q_pos, k_pos, q_doc, k_doc, causal, window, q.shape[0])
            dq += dq_blk
            dkv = torch.stack([dk_blk, dv_blk])
            if step > 0:  # the accumulator of this block, sent by rank - 1 at its previous step
                _wait(dkv_requests)
                dkv += dkv_in
            if ring.size > 1:  # pass it on; at the last step this hop brings it home
                dkv_in = torch.empty_like(dkv)
                dkv_requests = ring.exchange("backward", [dkv], [dkv_in])
            else:
                dkv_in = dkv
            _wait(kv_requests)
            kv_cur, kv_spare = kv_spare, kv_cur
            coord_cur, coord_spare = coord_spare, coord_cur
        _wait(dkv_requests)  # dkv_in now holds this rank's own dK/dV, summed over all ranks

        return dq.to(q.dtype), dkv_in[0].to(k.dtype), dkv_in[1].to(v.dtype), *([None] * 6)


def ring_attention(
    q, k, v, q_pos, q_doc=None, group=None, causal=True, window=None, scale=None,
    counters: AttentionCounters | None = None, kernel: LocalKernel | str | None = None,
):
    """Ring attention of this rank's shards. Returns (out (b, s_local, h, d), lse (b, h, s_local)).

    q (b, s_local, h, d), k / v (b, s_local, h_kv, d) with h % h_kv == 0: this
    rank's tokens. ``q_pos`` / ``q_doc``: their global positions and document
    ids, (s_local,) or (b, s_local); they describe the local K/V too. ``q_doc``
    None means one document; -1 marks padding. ``group``: the context-parallel
    process group (None: the default group, or no ring if torch.distributed is
    not initialised). ``counters`` receives pairs, bytes and messages per phase.
    ``kernel``: the local kernel per block ("torch", "triton", "auto" or a LocalKernel).
    lse is float32 (float64 for float64 inputs), -inf on rows that see no key.
    """
    if q_doc is None:
        q_doc = torch.zeros_like(q_pos)
    check_shard_inputs(q, k, v, q_pos, q_doc, window)
    q_pos, q_doc = shard_coords(q, q_pos, q_doc)
    ring = _Ring(group, counters, as_local_kernel(kernel, q))
    return RingAttentionFunction.apply(q, k, v, q_pos, q_doc, ring, causal, window, scale)

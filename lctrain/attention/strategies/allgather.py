"""All-gather context parallelism (the Llama 3 recipe).

Every rank holds a shard of the sequence (any layout). Forward: all-gather the
K/V shards and their global coordinates from every rank of the group, then
attend the local queries to all keys in one local-kernel call. Masking is by
global coordinates, so the gathered key order (group-rank order) does not
matter and every layout works unchanged.

Backward: the K/V shards are all-gathered again (only the local shards are
saved, so activation memory stays O(local)); the local kernel gives dq for the
local queries and dK/dV for *every* key, accumulated in fp32 (fp64 for fp64
inputs); a reduce-scatter then sums those partial dK/dV over the ranks and
leaves each rank the gradient of its own shard.

Collectives per call on a group of P > 1 ranks:

- forward: 2 all-gathers (K and V packed into one tensor; pos and doc packed
  into one int64 tensor);
- backward: 1 all-gather (K/V again) + 1 reduce-scatter (dK and dV packed).

gloo (torch >= 2.x) implements ``dist.reduce_scatter`` (list form), so the
same code runs on CPU and on NCCL. Every rank must hold the same number of
tokens (all layouts guarantee it): all-gather needs equal shard shapes.
Counters follow ``lctrain.distributed.comm``'s byte convention.
"""

from __future__ import annotations

import torch

from lctrain.distributed.comm import GroupComm
from lctrain_kernels.mask import CAUSAL, Coords, Mask

from ..checks import check_shard_inputs, shard_coords
from ..local_kernels import LocalKernel, as_local_kernel
from .base import Strategy, register


def gather_kv(k, v, comm: GroupComm, phase: str):
    """Every rank's K and V (one packed all-gather), in group-rank order along the sequence."""
    kv_all = comm.all_gather(torch.cat([k, v], dim=2), dim=1, phase=phase)
    return kv_all.split(k.shape[2], dim=2)


def allgather_forward(q, k, v, coords: Coords, comm: GroupComm, mask: Mask, scale, kernel: LocalKernel):
    """(out, lse, coordinates of all keys) of the local queries over every rank's keys."""
    k_all, v_all = gather_kv(k, v, comm, "forward")
    k_coords = Coords.unstack(comm.all_gather(torch.stack(coords), dim=-1, phase="forward"))
    out, lse = kernel.forward(q, k_all, v_all, coords, k_coords, mask, scale)
    comm.count_pairs("forward", coords, k_coords, mask, q.shape[0])
    return out, lse, k_coords


def allgather_backward(dout, q, k, v, out, lse, coords: Coords, k_coords: Coords, comm: GroupComm, mask: Mask,
                       scale, kernel: LocalKernel):
    """(dq, dk, dv) of the local shard; dK/dV of every key summed over the ranks (reduce-scatter)."""
    k_all, v_all = gather_kv(k, v, comm, "backward")
    dq, dk_all, dv_all = kernel.backward(dout, q, k_all, v_all, out, lse, coords, k_coords, mask, scale)
    comm.count_pairs("backward", coords, k_coords, mask, q.shape[0])
    # Sum every rank's partial dK/dV (accumulation dtype) and keep this rank's slice.
    dkv = comm.reduce_scatter(torch.cat([dk_all, dv_all], dim=2), dim=1, phase="backward")
    dk, dv = dkv.split(k.shape[2], dim=2)
    return dq, dk, dv


class AllGatherAttentionFunction(torch.autograd.Function):
    """Autograd function: gradients flow through ``out``; ``lse`` is non-differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, coords, comm, mask, scale, kernel):
        out, lse, k_coords = allgather_forward(q, k, v, coords, comm, mask, scale, kernel)
        # Only the local K/V shards are saved; backward gathers them again.
        ctx.save_for_backward(q, k, v, out, lse, *coords, *k_coords)
        ctx.settings = (comm, mask, scale, kernel)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, q_pos, q_doc, k_pos, k_doc = ctx.saved_tensors
        dq, dk, dv = allgather_backward(dout, q, k, v, out, lse, Coords(q_pos, q_doc), Coords(k_pos, k_doc),
                                        *ctx.settings)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *([None] * 5)


def allgather_attention(q, k, v, coords: Coords, group=None, mask: Mask = CAUSAL, scale=None, counters=None,
                        kernel: LocalKernel | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather context-parallel attention on this rank's local shards.

    Same contract as ``ring_attention``: q (b, s_local, h, d), k/v (b, s_local, h_kv, d),
    ``coords`` of the local tokens; returns out (b, s_local, h, d) in q's dtype and lse
    (b, h, s_local) in fp32 (fp64 for fp64 inputs), -inf for rows that see no key.
    """
    check_shard_inputs(q, k, v, coords)
    return AllGatherAttentionFunction.apply(q, k, v, shard_coords(q, coords), GroupComm(group, counters), mask,
                                            scale, as_local_kernel(kernel, q))


@register
class AllGatherStrategy(Strategy):
    name = "allgather"

    def attend(self, group, layout, **options):
        return lambda q, k, v, coords, mask, scale, counters, kernel: allgather_attention(
            q, k, v, coords, group, mask, scale, counters, kernel)

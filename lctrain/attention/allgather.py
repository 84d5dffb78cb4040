"""All-gather context parallelism (the Llama 3 recipe).

Every rank holds a shard of the sequence (any layout). Forward: all-gather the
K/V shards and their global coordinates (pos, doc) from every rank of the
group, then attend the local queries to all keys in one local-kernel call.
Masking is by global coordinates, so the gathered key order (group-rank order)
does not matter and every layout works unchanged.

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

Counters (optional, per rank): ``pairs`` = unmasked (query, key) pairs the
local kernel computed, summed over batch rows, in "forward" and again in
"backward"; ``messages`` = collective calls; ``bytes_sent`` = this rank's
share of each collective as a ring algorithm sends it: an all-gather sends
the local shard to P - 1 peers, (P - 1) * shard bytes; a reduce-scatter of a
buffer B sends (P - 1) / P * B, i.e. (P - 1) * bytes of one rank's slice (in
the accumulation dtype).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lctrain_kernels.mask import as_batched

from .checks import check_shard_inputs
from .counters import count_visible_pairs, tensor_bytes
from .local_kernels import as_local_kernel


def group_size(group) -> int:
    """Ranks in ``group``; 1 when torch.distributed is not initialised and no group is given."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _all_gather_cat(x: torch.Tensor, group, num_ranks: int, dim: int) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim`` in group-rank order."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(num_ranks)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _pairs(q_pos, k_pos, q_doc, k_doc, causal, window, batch) -> int:
    """Unmasked pairs summed over ``batch`` rows (coordinates may be shared by the batch)."""
    pairs = count_visible_pairs(q_pos, k_pos, q_doc, k_doc, causal, window)
    coord_rows = max(as_batched(q_pos).shape[0], as_batched(q_doc).shape[0])
    return pairs * (batch // coord_rows)


class AllGatherAttentionFunction(torch.autograd.Function):
    """Autograd function: gradients flow through ``out``; ``lse`` is non-differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, q_pos, q_doc, group, causal, window, scale, counters, kernel):
        num_ranks = group_size(group)
        coords = torch.stack(torch.broadcast_tensors(as_batched(q_pos).long(), as_batched(q_doc).long()))
        if num_ranks > 1:
            kv = torch.cat([k, v], dim=2)
            kv_all = _all_gather_cat(kv, group, num_ranks, dim=1)
            k_all, v_all = kv_all.split(k.shape[2], dim=2)
            coords_all = _all_gather_cat(coords, group, num_ranks, dim=-1)
            if counters is not None:
                sent = (num_ranks - 1) * tensor_bytes(kv, coords)
                counters.add("forward", bytes_sent=sent, messages=2)
        else:
            k_all, v_all, coords_all = k, v, coords
        k_pos, k_doc = coords_all[0], coords_all[1]
        out, lse = kernel.forward(q, k_all, v_all, q_pos, k_pos, q_doc, k_doc, causal, window, scale)
        if counters is not None:
            counters.add("forward", pairs=_pairs(q_pos, k_pos, q_doc, k_doc, causal, window, q.shape[0]))

        # Only the local K/V shards are saved; backward gathers them again.
        ctx.save_for_backward(q, k, v, out, lse, q_pos, q_doc, k_pos, k_doc)
        ctx.settings = (group, num_ranks, causal, window, scale, counters, kernel)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, q_pos, q_doc, k_pos, k_doc = ctx.saved_tensors
        group, num_ranks, causal, window, scale, counters, kernel = ctx.settings
        num_kv_heads = k.shape[2]
        if num_ranks > 1:
            kv = torch.cat([k, v], dim=2)
            k_all, v_all = _all_gather_cat(kv, group, num_ranks, dim=1).split(num_kv_heads, dim=2)
        else:
            k_all, v_all = k, v
        dq, dk_all, dv_all = kernel.backward(
            dout, q, k_all, v_all, out, lse, q_pos, k_pos, q_doc, k_doc, causal, window, scale
        )
        if num_ranks > 1:
            # Sum every rank's partial dK/dV (accumulation dtype) and keep this rank's slice.
            dkv_all = torch.cat([dk_all, dv_all], dim=2)
            slices = [part.contiguous() for part in dkv_all.chunk(num_ranks, dim=1)]
            dkv = torch.empty_like(slices[0])
            dist.reduce_scatter(dkv, slices, group=group)
            dk, dv = dkv.split(num_kv_heads, dim=2)
            if counters is not None:
                sent = (num_ranks - 1) * (tensor_bytes(kv) + tensor_bytes(dkv))
                counters.add("backward", bytes_sent=sent, messages=2)
        else:
            dk, dv = dk_all, dv_all
        if counters is not None:
            counters.add("backward", pairs=_pairs(q_pos, k_pos, q_doc, k_doc, causal, window, q.shape[0]))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *([None] * 8)


def allgather_attention(
    q, k, v, q_pos, q_doc, group, causal=True, window=None, scale=None, counters=None, kernel=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather context-parallel attention on this rank's local shards.

    q (b, s_local, h, d), k/v (b, s_local, h_kv, d): the same local tokens;
    ``q_pos`` / ``q_doc``: their global positions and document ids, (s_local,)
    or (b, s_local), doc -1 = padding. ``group``: the context-parallel process
    group (None = the default group, or a single rank when torch.distributed
    is not initialised). Returns out (b, s_local, h, d) in q's dtype and lse
    (b, h, s_local) in fp32 (fp64 for fp64 inputs), -inf for rows that see no
    key. Differentiable in q, k, v. ``counters``: an AttentionCounters; ``kernel``: the local
    kernel ("torch", "triton", "auto" or a LocalKernel).
    """
    check_shard_inputs(q, k, v, q_pos, q_doc, window)
    q_pos, q_doc = q_pos.to(q.device), q_doc.to(q.device)
    return AllGatherAttentionFunction.apply(q, k, v, q_pos, q_doc, group, causal, window, scale, counters,
                                            as_local_kernel(kernel, q))

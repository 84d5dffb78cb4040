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

Each exchange is its own autograd Function from ``ulysses`` (backward = the
reverse exchange of the gradient) and the ring is ``RingAttentionFunction``, so
autograd chains the three exactly. Masking is by global coordinates, so any
layout works; with the striped layout every Ulysses group holds a stripe of the
sequence and the ring stays balanced.

Heads: the Ulysses degree U follows the rules of ``ulysses`` (h % U == 0; K/V
heads split, or replicated when U is a multiple of h_kv). Counters: the
exchanges record their collectives and bytes as Ulysses does, the ring its hops
and bytes as ring does; ring pairs are token pairs computed for h / U of the
heads, so each rank reports its 1/U share and the cp group's sum stays the
sequence's visible pairs.
"""

from __future__ import annotations

import torch

import torch.distributed as dist

from lctrain.distributed.comm import GroupComm, group_size
from lctrain.distributed.groups import build_parallel_groups, check_degrees
from lctrain_kernels.mask import CAUSAL, Coords, Mask

from ..checks import shard_coords
from ..local_kernels import as_local_kernel
from .base import Strategy, register
from .ring import RingAttentionFunction
from .ulysses import HeadsToSeq, SeqToHeads, check_heads, check_ulysses_inputs, gather_coords, kv_replicas, lse_to_seq


def usp_attention(q, k, v, coords: Coords, ulysses_group, ring_group, mask: Mask = CAUSAL, scale=None,
                  counters=None, kernel=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ulysses x ring attention on this rank's shards (same contract as ``ring_attention``).

    ``ulysses_group`` / ``ring_group``: this rank's subgroups of the cp group
    (``build_parallel_groups(..., ulysses_size=U).usp_groups``). Returns out
    (b, s_local, h, d) in q's dtype and lse (b, h, s_local) in fp32 (fp64 for
    fp64 inputs). Differentiable in q, k, v.
    """
    num_ulysses = group_size(ulysses_group)
    check_ulysses_inputs(q, k, v, coords, num_ulysses)
    replicas = kv_replicas(k.shape[2], num_ulysses)
    if replicas > 1:  # autograd sums the replicas' gradients back into each K/V head
        k, v = k.repeat_interleave(replicas, dim=2), v.repeat_interleave(replicas, dim=2)
    exchange = GroupComm(ulysses_group, counters)
    group_coords = gather_coords(shard_coords(q, coords), exchange)
    q_h, k_h, v_h = SeqToHeads.apply(exchange, q, k, v)

    ring_counters = None if counters is None else counters.share_of(exchange.rank, num_ulysses)
    ring = GroupComm(ring_group, ring_counters)
    group_coords = Coords(*(c.expand(q.shape[0], -1).contiguous() for c in group_coords))
    out_h, lse_h = RingAttentionFunction.apply(q_h, k_h, v_h, group_coords, ring, mask, scale,
                                               as_local_kernel(kernel, q))
    return HeadsToSeq.apply(exchange, out_h), lse_to_seq(lse_h, exchange, "forward")


def default_group_subgroups(layout, ulysses_size: int):
    """(ulysses_group, ring_group) factoring the default group; every rank must call it."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if layout.cp_size != world:
        raise ValueError(f"layout cp_size={layout.cp_size} but the default group has {world} ranks")
    if world == 1:
        return None, None
    return build_parallel_groups(dist.get_rank(), world, 1, world, ulysses_size).usp_groups


@register
class UspStrategy(Strategy):
    name = "usp"
    decodes = False
    options = {"subgroups": None, "ulysses_size": None}

    def validate(self, cfg, world_size: int) -> int:
        dp = super().validate(cfg, world_size)
        check_degrees(cfg.cp.size, 1, cfg.cp.size, cfg.cp.ulysses_size)
        check_heads(cfg, cfg.cp.ulysses_size)
        return dp

    def ulysses_size(self, cfg) -> int:
        return cfg.cp.ulysses_size

    def config_options(self, cfg, groups) -> dict:
        return {"subgroups": groups.usp_groups}

    def attend(self, group, layout, subgroups=None, ulysses_size=None):
        if subgroups is None:
            if group is not None or ulysses_size is None:
                raise ValueError(
                    "strategy 'usp' needs subgroups=build_parallel_groups(..., ulysses_size=U).usp_groups, "
                    "or group=None with ulysses_size=U to factor the default group")
            subgroups = default_group_subgroups(layout, ulysses_size)
        ulysses_group, ring_group = subgroups
        return lambda q, k, v, coords, mask, scale, counters, kernel: usp_attention(
            q, k, v, coords, ulysses_group, ring_group, mask, scale, counters, kernel)

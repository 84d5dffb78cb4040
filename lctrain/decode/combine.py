"""Exact combination of per-rank partial attention for one decoded query.

Every rank holds a shard of the KV cache and computes the partial attention
(out_r, lse_r) of the (replicated) new query against it. The softmax over the
whole sequence is an associative log-sum-exp reduction, finished either way:

- ``tree_combine`` (Tree Attention, Shyam et al.): all-reduce MAX of lse -> m;
  all-reduce SUM of [exp(lse_r - m) * out_r, exp(lse_r - m)] packed as one
  (b, 1, h, d + 1) buffer in fp32 (fp64 for fp64 inputs); out = num / den,
  lse = m + log(den). Two collectives per layer whatever P is; NCCL / gloo run
  them as trees or recursive doubling (O(log P) latency steps).
- ``ring_combine`` (baseline): the running (out, lse) travels along the ring
  0 -> 1 -> ... -> P-1, each rank merging its own partial with
  ``merge_partials`` before passing it on: P - 1 sequential P2P hops. Rank P-1
  then holds the result and returns it to all ranks by one broadcast
  (``finish="broadcast"``) or by a second pass around the ring
  (``finish="ring"``, P - 1 more hops; pure point-to-point).
- ``butterfly_combine``: the tree reduction written out in P2P (recursive
  doubling): in round i every rank swaps its running (out, lse) with rank
  XOR 2^i and merges; after log2 P rounds every rank holds the result. For
  backends whose all-reduce is itself a ring (gloo on CPU), this is what shows
  the O(log P) latency; P must be a power of two. Partners always merge
  (lower ranks' part, higher ranks' part) in that order, so every rank ends
  with bitwise the same result.

A rank whose shard holds no visible key has lse = -inf and out = 0 and
contributes nothing; no NaN arises.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lctrain.attention.merge import merge_partials
from lctrain.distributed.comm import GroupComm
from lctrain_kernels.mask import Coords, Mask, count_visible_pairs
from lctrain_kernels.reference import accumulation_dtype
from lctrain_kernels.torch_blockwise import blockwise_forward

PHASE = "decode"


@dataclass
class DecodeCounters:
    """Per-rank communication and work of decoding, summed over decoded tokens.

    ``collectives``: collective calls this rank issued (all-reduce, broadcast);
    ``p2p_messages``: point-to-point sends by this rank; ``hops``: sequential
    P2P hops on the critical path (the ring chain), the same on every rank;
    ``bytes_sent``: this rank's payload, as ``lctrain.distributed.comm`` counts
    it; ``pairs``: query-key pairs computed locally (counted on the device, read
    back when asked for); ``appended``: decoded tokens whose K/V this rank cached.
    """

    tokens: int = 0
    collectives: int = 0
    p2p_messages: int = 0
    hops: int = 0
    bytes_sent: int = 0
    appended: int = 0
    per_kind: dict = field(default_factory=dict)  # e.g. {"all_reduce": n, "broadcast": n, "send": n}
    _pairs: list = field(default_factory=list)

    def record_comm(self, phase: str, kind: str, bytes_sent: int, collective: bool) -> None:
        """One communication operation (``lctrain.distributed.comm`` calls this)."""
        self.per_kind[kind] = self.per_kind.get(kind, 0) + 1
        self.bytes_sent += bytes_sent
        if collective:
            self.collectives += 1
        else:
            self.p2p_messages += 1

    def add_pairs(self, phase: str, q: Coords, k: Coords, mask: Mask, batch: int, share=(0, 1)) -> None:
        self._pairs.append(count_visible_pairs(q, k, mask) * batch)

    @property
    def pairs(self) -> int:
        if len(self._pairs) > 1:
            self._pairs = [torch.stack(self._pairs).sum()]
        return int(self._pairs[0]) if self._pairs else 0

    @property
    def latency_steps(self) -> int:
        """Sequential communication steps: each collective call plus each chain hop."""
        return self.collectives + self.hops

    def per_token(self) -> dict:
        n = max(self.tokens, 1)
        return {"tokens": self.tokens, "collectives": self.collectives / n, "hops": self.hops / n,
                "latency_steps": self.latency_steps / n, "p2p_messages": self.p2p_messages / n,
                "bytes_sent": self.bytes_sent / n, "pairs": self.pairs / n,
                "per_kind": {k: v / n for k, v in self.per_kind.items()}}


def decode_comm(cp_group, counters: DecodeCounters | None = None) -> GroupComm:
    """The comm of decoding over ``cp_group``; None is no context parallelism (this process
    alone, even inside a larger job), as ``ParallelGroups.cp_group`` is None when cp == 1."""
    counters = counters if counters is not None else DecodeCounters()
    return GroupComm(cp_group, counters, alone=cp_group is None)


def local_partial(q, k, v, q_coords: Coords, k_coords: Coords, mask: Mask, comm: GroupComm | None = None):
    """Partial (out (b, s, h, d), lse (b, h, s)) of the new queries against the local
    cache shard; out 0 and lse -inf where the shard holds no visible key."""
    if k.shape[1] == 0:
        acc = accumulation_dtype(q.dtype)
        return q.new_zeros(q.shape, dtype=acc), q.new_full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=acc)
    if comm is not None:
        comm.count_pairs(PHASE, q_coords, k_coords, mask, q.shape[0])
    # The partial stays in the accumulation dtype: the combine rescales it before any rounding.
    return blockwise_forward(q, k, v, q_coords, k_coords, mask, out_dtype=accumulation_dtype(q.dtype))


def _pack(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """One payload (b, s, h, d + 1) with lse in the last column."""
    return torch.cat([out, lse.transpose(1, 2).unsqueeze(-1)], dim=-1).contiguous()


def _unpack(packed: torch.Tensor):
    return packed[..., :-1], packed[..., -1].transpose(1, 2)


def tree_combine(out: torch.Tensor, lse: torch.Tensor, comm: GroupComm):
    """Exact (out, lse) over every rank's keys: all-reduce MAX, then one packed all-reduce SUM."""
    acc = torch.promote_types(lse.dtype, torch.float32)
    if comm.size == 1:
        return out.to(acc), lse.to(acc)
    lse_max = comm.all_reduce(lse.to(acc).clone(), PHASE, op=dist.ReduceOp.MAX)  # (b, h, s)
    # A row no rank has a key for keeps max -inf: shift by 0 so exp(-inf) = 0, not NaN.
    shift = torch.where(lse_max == float("-inf"), 0.0, lse_max)
    weight = torch.exp(lse.to(acc) - shift).transpose(1, 2).unsqueeze(-1)  # (b, s, h, 1)
    packed = comm.all_reduce(torch.cat([out.to(acc) * weight, weight], dim=-1), PHASE)
    num, den = packed[..., :-1], packed[..., -1]
    seen = den > 0
    combined = num / torch.where(seen, den, 1.0).unsqueeze(-1)
    log_den = torch.where(seen, torch.log(torch.where(seen, den, 1.0)), float("-inf"))
    return combined, shift + log_den.transpose(1, 2)


def ring_combine(out: torch.Tensor, lse: torch.Tensor, comm: GroupComm, finish: str = "broadcast"):
    """Exact (out, lse) by merging along the ring 0 -> ... -> P-1, then returning the result
    from rank P-1 by a broadcast (``finish="broadcast"``) or a second ring pass (``"ring"``)."""
    if finish not in RING_FINISHES:
        raise ValueError(f"ring finish must be one of {RING_FINISHES}, got {finish!r}")
    acc = torch.promote_types(lse.dtype, torch.float32)
    out, lse = out.to(acc), lse.to(acc)
    size, rank = comm.size, comm.rank
    if size == 1:
        return out, lse
    if rank > 0:
        got = comm.recv(out.new_empty((*out.shape[:-1], out.shape[-1] + 1)), rank - 1)
        out, lse = merge_partials(*_unpack(got), out, lse)
    packed = _pack(out, lse)
    if rank < size - 1:
        comm.send(packed, rank + 1, PHASE)
    comm.counters.hops += size - 1
    if finish == "broadcast":
        comm.broadcast(packed, size - 1, PHASE)
    else:  # P-1 -> 0 -> 1 -> ... -> P-2
        if rank != size - 1:
            comm.recv(packed, (rank - 1) % size)
        if rank != size - 2:
            comm.send(packed, (rank + 1) % size, PHASE)
        comm.counters.hops += size - 1
    return _unpack(packed)


def butterfly_combine(out: torch.Tensor, lse: torch.Tensor, comm: GroupComm):
    """Exact (out, lse) by recursive doubling: log2 P rounds of one P2P swap + merge."""
    acc = torch.promote_types(lse.dtype, torch.float32)
    out, lse = out.to(acc), lse.to(acc)
    size, rank = comm.size, comm.rank
    if size & (size - 1):
        raise ValueError(f"decode='butterfly' needs a power-of-two cp size, got {size}; use decode='tree'")
    step = 1
    while step < size:
        partner = rank ^ step
        theirs = _unpack(comm.swap(_pack(out, lse), partner, PHASE))
        comm.counters.hops += 1
        low, high = ((out, lse), theirs) if rank < partner else (theirs, (out, lse))
        out, lse = merge_partials(*low, *high)
        step <<= 1
    return out, lse


COMBINES = {"tree": tree_combine, "ring": ring_combine, "butterfly": butterfly_combine}
RING_FINISHES = ("broadcast", "ring")

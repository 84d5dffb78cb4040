"""The one communication layer: this rank's place in a process group and the collectives
every attention strategy and distributed decoding issue over it.

``GroupComm(group, counters)`` works the same with no process group (one rank: every
collective is the identity), over the default group (``group=None`` inside an initialised
job) or over any subgroup. Every tensor it sends lives where the caller's tensors live, so
NCCL (CUDA tensors) and gloo (CPU) take the same code.

Counting is opt-in: with ``counters=None`` nothing is recorded. When counters are given, each
operation calls ``counters.record_comm(phase, kind, bytes_sent, collective)`` with sizes known
from shapes alone (no device sync). Bytes follow one convention, what this rank contributes as
a ring algorithm sends it:

- all-gather of a local part X: (P - 1) |X|;
- reduce-scatter of a buffer of P slices: (P - 1) |slice|;
- all-reduce of B: 2 (P - 1) / P |B|;
- all-to-all of a (P, n) row buffer: the P - 1 rows that leave this rank;
- broadcast: |B| from the root, 0 elsewhere; point-to-point: the payload.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

# Point-to-point waits do not follow a process group's timeout once it is changed (gloo), so
# the watchdog sets theirs here too (None: the group's own).
_P2P_TIMEOUT: list[timedelta | None] = [None]


def set_p2p_timeout(seconds: float | None) -> None:
    _P2P_TIMEOUT[0] = None if seconds is None else timedelta(seconds=seconds)


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def group_size(group) -> int:
    """Ranks in ``group``; 1 when torch.distributed is not initialised and no group is given."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class GroupComm:
    """Size, rank and neighbours of this rank in ``group``, and counted collectives over it."""

    def __init__(self, group=None, counters=None, alone: bool = False):
        """``alone=True``: this process by itself, even inside a larger job (no collectives)."""
        self.size = 1 if alone else group_size(group)
        self.rank = dist.get_rank(group) if self.size > 1 or (group is not None and not alone) else 0
        self.group = None if alone else group if group is not None or self.size == 1 else dist.group.WORLD
        self.counters = counters

    def __repr__(self) -> str:
        return f"GroupComm(rank={self.rank}, size={self.size})"

    def _count(self, phase: str, kind: str, bytes_sent: int, collective: bool = True) -> None:
        if self.counters is not None:
            self.counters.record_comm(phase, kind, bytes_sent, collective)

    def count_pairs(self, phase: str, q, k, mask, batch: int, share=(0, 1)) -> None:
        """Hand the visible pairs of a local-kernel call to the counters, if any (counted on the
        device); ``share=(rank, n)``: this rank's 1/n of them (head-sharded strategies)."""
        if self.counters is not None:
            self.counters.add_pairs(phase, q, k, mask, batch, share)

    def global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank % self.size)

    # ------------------------------------------------------------------ collectives
    def all_gather(self, x: torch.Tensor, dim: int, phase: str) -> torch.Tensor:
        """Every rank's ``x`` concatenated along ``dim`` in group-rank order."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        self._count(phase, "all_gather", (self.size - 1) * tensor_bytes(x))
        return torch.cat(parts, dim=dim)

    def all_reduce(self, x: torch.Tensor, phase: str, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """Reduce ``x`` in place over the group (and return it)."""
        if self.size > 1:
            dist.all_reduce(x, op=op, group=self.group)
            self._count(phase, "all_reduce", 2 * (self.size - 1) * tensor_bytes(x) // self.size)
        return x

    def reduce_scatter(self, x: torch.Tensor, dim: int, phase: str) -> torch.Tensor:
        """Sum ``x`` over ranks; keep slice number ``rank`` of P equal slices along ``dim``."""
        if self.size == 1:
            return x
        slices = [part.contiguous() for part in x.chunk(self.size, dim=dim)]
        mine = torch.empty_like(slices[0])
        dist.reduce_scatter(mine, slices, group=self.group)
        self._count(phase, "reduce_scatter", (self.size - 1) * tensor_bytes(mine))
        return mine

    def all_to_all(self, rows: list[torch.Tensor], phase: str) -> list[torch.Tensor]:
        """(P, n_i) row buffers of one dtype, row j to group rank j, packed into one call;
        returns the (P, n_i) buffers received, row j from group rank j."""
        if self.size == 1:
            return list(rows)
        widths = [r.shape[1] for r in rows]
        send = torch.cat(rows, dim=1).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        self._count(phase, "all_to_all", (self.size - 1) * tensor_bytes(send[0]))
        return list(recv.split(widths, dim=1))

    def broadcast(self, x: torch.Tensor, src: int, phase: str) -> torch.Tensor:
        """Group rank ``src``'s ``x`` on every rank (in place)."""
        if self.size > 1:
            dist.broadcast(x, group=self.group, group_src=src)
            self._count(phase, "broadcast", tensor_bytes(x) if self.rank == src else 0)
        return x

    # ------------------------------------------------------------------ point to point
    def ring_exchange(self, send: list[torch.Tensor], recv: list[torch.Tensor], phase: str) -> list:
        """Post ``send`` to rank + 1 and receives into ``recv`` from rank - 1 as one batched
        transfer (one message); returns the requests to wait on."""
        next_rank, prev_rank = self.global_rank(self.rank + 1), self.global_rank(self.rank - 1)
        ops = [dist.P2POp(dist.isend, t, next_rank, self.group) for t in send]
        ops += [dist.P2POp(dist.irecv, t, prev_rank, self.group) for t in recv]
        self._count(phase, "sendrecv", tensor_bytes(*send), collective=False)
        return dist.batch_isend_irecv(ops)

    def swap(self, x: torch.Tensor, partner: int, phase: str) -> torch.Tensor:
        """Send ``x`` to group rank ``partner`` and receive its tensor of the same shape."""
        got = torch.empty_like(x)
        ops = [dist.P2POp(dist.isend, x, group=self.group, group_peer=partner),
               dist.P2POp(dist.irecv, got, group=self.group, group_peer=partner)]
        wait(dist.batch_isend_irecv(ops))
        self._count(phase, "sendrecv", tensor_bytes(x), collective=False)
        return got

    def send(self, x: torch.Tensor, dst: int, phase: str) -> None:
        wait([dist.isend(x, group=self.group, group_dst=dst)])
        self._count(phase, "send", tensor_bytes(x), collective=False)

    def recv(self, x: torch.Tensor, src: int) -> torch.Tensor:
        wait([dist.irecv(x, group=self.group, group_src=src)])
        return x


def wait(requests) -> None:
    """Wait for point-to-point requests, within the watchdog's timeout when one is set."""
    timeout = _P2P_TIMEOUT[0]
    for request in requests:
        if timeout is None:
            request.wait()
        else:
            request.wait(timeout)

"""Server side: fuse every received task into one packed call of the local kernel.

Tasks from different workers and documents become "documents" of one packed
sequence: queries of task i carry doc id = task_id and their original
positions (the worker's local token coordinates), keys likewise. The mask rule
(same doc, causal / window on positions) then reproduces each task exactly, so
one kernel call computes all of them, however unequal their lengths, and its
tile skipping keeps the cost at the tasks' own visible pairs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from lctrain_kernels.mask import Coords

from .protocol import FORWARD, CallSpec
from .scheduler import ScheduledTask

# (sender rank, the scheduled task, its tensors as unpack_request returns them)
Request = tuple[int, ScheduledTask, tuple[torch.Tensor, ...]]


@dataclass
class RebatchedCall:
    """Packed inputs of one kernel call; q is (1, Sq, h, d), k and v are (1, Sk, h_kv, d)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_coords: Coords  # (Sq,) positions, and task ids as doc ids
    k_coords: Coords
    task_ids: list[int]  # in packed order (ascending)
    senders: list[int]  # worker rank of each task
    q_lens: list[int]
    kv_lens: list[int]
    dout: torch.Tensor | None = None  # backward: (1, Sq, h, d)
    lse: torch.Tensor | None = None  # backward: (1, h, Sq)
    delta: torch.Tensor | None = None  # backward: (1, h, Sq)

    def split_forward(self, out: torch.Tensor, lse: torch.Tensor) -> dict[int, list[tuple[torch.Tensor, ...]]]:
        """Per sender rank, its tasks' (out (q_len, h, d), lse (h, q_len)) in task_id order."""
        return self._by_sender(zip(out[0].split(self.q_lens), lse[0].split(self.q_lens, dim=1)))

    def split_backward(self, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> dict[int, list[tuple]]:
        """Per sender rank, its tasks' (dq (q_len, h, d), dk, dv (kv_len, h_kv, d)) in task_id order."""
        return self._by_sender(zip(dq[0].split(self.q_lens), dk[0].split(self.kv_lens), dv[0].split(self.kv_lens)))

    def _by_sender(self, per_task: Iterable[tuple]) -> dict[int, list[tuple]]:
        per_sender: dict[int, list] = defaultdict(list)
        for sender, results in zip(self.senders, per_task):
            per_sender[sender].append(results)
        return per_sender


def _coords(ranges: list[tuple[int, int, int]]) -> Coords:
    """Packed coordinates of (task_id, start, length) token ranges."""
    pos = torch.cat([torch.arange(start, start + length) for _, start, length in ranges])
    doc = torch.cat([torch.full((length,), task_id, dtype=torch.int64) for task_id, _, length in ranges])
    return Coords(pos, doc)


def rebatch(requests: Sequence[Request]) -> RebatchedCall:
    """One packed call of every received task, already validated.

    Tasks are ordered by task_id, which the plan makes unique over all workers,
    so the packed order (and hence every rank's view of it) is deterministic.
    """
    if not requests:
        raise ValueError("rebatch needs at least one task; skip the kernel call on a server with no work")
    requests = sorted(requests, key=lambda request: request[1].task_id)
    ids = [scheduled.task_id for _, scheduled, _ in requests]
    if len(set(ids)) != len(ids):
        raise ValueError(f"task ids repeat across senders {sorted({sender for sender, _, _ in requests})}: "
                         f"the workers computed different plans")
    tasks = [scheduled.task for _, scheduled, _ in requests]
    columns = list(zip(*(tensors for _, _, tensors in requests)))  # per kind of tensor, every task's
    q, k, v = (torch.cat(column)[None] for column in columns[:3])
    backward = {}
    if len(columns) > 3:  # dout (tokens first), lse and delta (heads first)
        dout, lse, delta = columns[3:]
        backward = {"dout": torch.cat(dout)[None], "lse": torch.cat(lse, dim=1)[None],
                    "delta": torch.cat(delta, dim=1)[None]}
    return RebatchedCall(
        q, k, v,
        q_coords=_coords([(i, t.q_start, t.q_len) for i, t in zip(ids, tasks)]),
        k_coords=_coords([(i, t.kv_start, t.kv_len) for i, t in zip(ids, tasks)]),
        task_ids=ids, senders=[sender for sender, _, _ in requests],
        q_lens=[t.q_len for t in tasks], kv_lens=[t.kv_len for t in tasks], **backward,
    )


def compute_results(requests: Sequence[Request], spec: CallSpec, kernel_for: Callable) -> dict[int, list[tuple]]:
    """Per sender its tasks' results (as ``pack_results`` takes them), from one call of the local
    kernel that ``kernel_for(q)`` picks for the packed q (a ``LocalKernel``)."""
    call = rebatch(requests)
    kernel = kernel_for(call.q)
    where = (call.q_coords, call.k_coords, spec.mask, spec.scale)
    if spec.op == FORWARD:
        return call.split_forward(*kernel.forward(call.q, call.k, call.v, *where))
    return call.split_backward(*kernel.backward(call.dout, call.q, call.k, call.v, None, call.lse, *where,
                                                delta=call.delta))

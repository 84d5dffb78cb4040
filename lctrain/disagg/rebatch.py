"""Server side: fuse every received task into one packed call of the local kernel.

Tasks from different workers and documents become "documents" of one packed
sequence: queries of task i carry doc id = task_id and their original
positions (the worker's local token coordinates), keys likewise. The mask rule
(same doc, causal / window on positions) then reproduces each task exactly, so
one kernel call computes all of them, however unequal their lengths, and its
tile skipping keeps the cost at the tasks' own visible pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lctrain_kernels.torch_blockwise import blockwise_attention

from .protocol import Field, unpack_payload


@dataclass
class RebatchedCall:
    """Packed inputs of one kernel call; q is (1, Sq, h, d), k and v are (1, Sk, h_kv, d)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_pos: torch.Tensor  # (Sq,) int64
    k_pos: torch.Tensor
    q_doc: torch.Tensor  # (Sq,) task ids
    k_doc: torch.Tensor
    task_ids: list[int]  # in packed order (ascending)
    senders: list[int]  # worker rank of each task
    q_lens: list[int]

    def run(self, causal: bool = True, window: int | None = None, scale: float | None = None,
            kernel: Callable = blockwise_attention) -> tuple[torch.Tensor, torch.Tensor]:
        """out (1, Sq, h, d) and lse (1, h, Sq) of every task at once (differentiable through q, k, v)."""
        return kernel(self.q, self.k, self.v, self.q_pos, self.k_pos, self.q_doc, self.k_doc,
                      causal=causal, window=window, scale=scale)

    def split(self, out: torch.Tensor, lse: torch.Tensor) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per sender rank, its tasks' (out (q_len, h, d), lse (h, q_len)) in task_id order."""
        per_sender: dict[int, list] = {}
        outs, lses = out[0].split(self.q_lens, dim=0), lse[0].split(self.q_lens, dim=1)
        for sender, task_out, task_lse in zip(self.senders, outs, lses):
            per_sender.setdefault(sender, []).append((task_out, task_lse))
        return per_sender


def rebatch(received: Sequence[tuple[int, torch.Tensor, torch.Tensor]]) -> RebatchedCall:
    """One packed call from (sender_rank, headers, payload) triples, already validated.

    Tasks are ordered by task_id, which the plan makes unique over all workers,
    so the packed order (and hence every rank's view of it) is deterministic.
    """
    items = []
    for sender, headers, payload in received:
        for row, (q, k, v) in zip(headers.tolist(), unpack_payload(headers, payload)):
            items.append((row[Field.TASK_ID], sender, row, q, k, v))
    items.sort(key=lambda item: item[0])
    if not items:
        raise ValueError("rebatch needs at least one task; skip the kernel call on a server with no work")
    ids = [item[0] for item in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"task ids repeat across senders {sorted({item[1] for item in items})}: "
                         f"the workers computed different plans")

    def coords(start_field: Field, len_field: Field) -> tuple[torch.Tensor, torch.Tensor]:
        pos = [torch.arange(row[start_field], row[start_field] + row[len_field]) for _, _, row, *_ in items]
        doc = [torch.full((row[len_field],), task_id, dtype=torch.int64) for task_id, _, row, *_ in items]
        return torch.cat(pos), torch.cat(doc)

    q_pos, q_doc = coords(Field.Q_START, Field.Q_LEN)
    k_pos, k_doc = coords(Field.KV_START, Field.KV_LEN)
    return RebatchedCall(
        q=torch.cat([item[3] for item in items])[None],
        k=torch.cat([item[4] for item in items])[None],
        v=torch.cat([item[5] for item in items])[None],
        q_pos=q_pos, k_pos=k_pos, q_doc=q_doc, k_doc=k_doc,
        task_ids=ids, senders=[item[1] for item in items], q_lens=[item[2][Field.Q_LEN] for item in items],
    )

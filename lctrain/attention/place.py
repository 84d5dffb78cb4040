"""A rank's place in a strategy's process group, shared by the ring and tree strategies."""

from __future__ import annotations

import torch.distributed as dist

from .counters import AttentionCounters, count_visible_pairs
from .local_kernels import TORCH_KERNEL, LocalKernel


class GroupPlace:
    """Group, size and rank (one rank when there is no process group), local kernel, counters."""

    def __init__(self, group, counters: AttentionCounters | None, kernel: LocalKernel | None = None):
        self.kernel = kernel if kernel is not None else TORCH_KERNEL
        if group is None and not dist.is_initialized():
            self.size, self.rank = 1, 0
        else:
            group = group if group is not None else dist.group.WORLD
            self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.group, self.counters = group, counters

    def count_pairs(self, phase, q_pos, k_pos, q_doc, k_doc, causal, window, batch) -> None:
        if self.counters is None:
            return
        pairs = count_visible_pairs(q_pos, k_pos, q_doc, k_doc, causal, window)
        rows = q_pos.shape[0]  # 1 when the coordinates are shared by the whole batch
        self.counters.add(phase, pairs=pairs * (batch // rows))

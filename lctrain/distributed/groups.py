"""Process groups for dp x cp: context-parallel groups are consecutive ranks.

Rank r has cp_rank = r % cp and dp_rank = r // cp, so the ranks sharing one
sequence sit on one node first (the fastest links carry the attention traffic).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist


@dataclass
class ParallelGroups:
    dp_size: int
    cp_size: int
    dp_rank: int
    cp_rank: int
    cp_group: Optional[dist.ProcessGroup]  # None when cp == 1 or no process group


def build_parallel_groups(rank: int, world_size: int, dp_size: int, cp_size: int) -> ParallelGroups:
    if dp_size * cp_size != world_size:
        raise ValueError(f"world size {world_size} != dp ({dp_size}) x cp ({cp_size})")
    cp_group = None
    if cp_size > 1 and dist.is_initialized():
        # Every rank must create every group, in the same order.
        for dp_index in range(dp_size):
            ranks = list(range(dp_index * cp_size, (dp_index + 1) * cp_size))
            group = dist.new_group(ranks)
            if rank in ranks:
                cp_group = group
    return ParallelGroups(dp_size, cp_size, rank // cp_size, rank % cp_size, cp_group)

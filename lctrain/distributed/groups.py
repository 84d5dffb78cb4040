"""Process groups for dp x cp, with cp optionally factored as ring x ulysses.

Built on DeviceMesh. The mesh is (dp, cp): rank r has cp_rank = r % cp and
dp_rank = r // cp, so the ranks sharing one sequence are consecutive and sit
on one node first (the fastest links carry the attention traffic). For the
hybrid (usp) a second mesh (dp, ring, ulysses) factors each cp group: the
Ulysses groups are ``ulysses`` consecutive ranks (their all-to-alls stay on
the fastest links) and the ring runs across those groups.
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
    ulysses_size: int = 1
    ulysses_group: Optional[dist.ProcessGroup] = None  # usp only
    ring_group: Optional[dist.ProcessGroup] = None  # usp only

    @property
    def usp_groups(self):
        """(ulysses_group, ring_group) for build_attention(strategy="usp", subgroups=...)."""
        return self.ulysses_group, self.ring_group


def check_degrees(world_size: int, dp_size: int, cp_size: int, ulysses_size: int = 1) -> None:
    """Raise ValueError, naming the fix, when the degrees do not factor the world."""
    if min(dp_size, cp_size, ulysses_size) < 1:
        raise ValueError(f"parallel degrees must be >= 1, got dp={dp_size}, cp={cp_size}, ulysses={ulysses_size}")
    if dp_size * cp_size != world_size:
        raise ValueError(
            f"world size {world_size} != dp ({dp_size}) x cp ({cp_size}); launch {dp_size * cp_size} "
            f"processes or pick a cp size that divides {world_size}"
        )
    if cp_size % ulysses_size:
        divisors = [d for d in range(1, cp_size + 1) if cp_size % d == 0]
        raise ValueError(
            f"the Ulysses degree ({ulysses_size}) must divide the cp size ({cp_size}); "
            f"choose one of {divisors}"
        )


def _device_type() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def build_parallel_groups(rank: int, world_size: int, dp_size: int, cp_size: int,
                          ulysses_size: int | None = None) -> ParallelGroups:
    """The groups of ``rank``. Every rank must call this, with the same degrees.

    ``ulysses_size`` (usp only) factors cp into ring x ulysses and builds both subgroups.
    """
    check_degrees(world_size, dp_size, cp_size, ulysses_size or 1)
    groups = ParallelGroups(dp_size, cp_size, rank // cp_size, rank % cp_size, None, ulysses_size or 1)
    if cp_size == 1 or not dist.is_initialized():
        return groups
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(_device_type(), (dp_size, cp_size), mesh_dim_names=("dp", "cp"))
    groups.cp_group = mesh.get_group("cp")
    if ulysses_size is not None:
        hybrid = init_device_mesh(_device_type(), (dp_size, cp_size // ulysses_size, ulysses_size),
                                  mesh_dim_names=("dp", "ring", "ulysses"))
        groups.ulysses_group, groups.ring_group = hybrid.get_group("ulysses"), hybrid.get_group("ring")
    return groups

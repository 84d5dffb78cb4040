"""Which global tokens each context-parallel rank holds.

- ``contiguous``: the sequence is cut into P chunks; rank r holds chunk r.
- ``zigzag``: 2P chunks; rank r holds chunks r and 2P-1-r, balancing causal work.
- ``striped``: token t lives on rank t mod P, balancing causal work token by token.

Local tokens are always kept in increasing global order, so the positions a
rank passes to a kernel are monotonic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUT_NAMES = ("contiguous", "zigzag", "striped")


@dataclass(frozen=True)
class Layout:
    name: str
    cp_size: int

    def __post_init__(self):
        if self.name not in LAYOUT_NAMES:
            raise ValueError(f"unknown layout {self.name!r}; choose one of {', '.join(LAYOUT_NAMES)}")
        if self.cp_size < 1:
            raise ValueError(f"cp_size must be >= 1, got {self.cp_size}")

    @property
    def multiple(self) -> int:
        """What the sequence length must be a multiple of."""
        return 2 * self.cp_size if self.name == "zigzag" else self.cp_size

    def check_seq_len(self, seq_len: int) -> None:
        if seq_len % self.multiple != 0:
            padded = -(-seq_len // self.multiple) * self.multiple
            raise ValueError(
                f"layout {self.name!r} with cp_size={self.cp_size} needs a sequence length that "
                f"is a multiple of {self.multiple}, got {seq_len}; pad the sequence to {padded} "
                f"(padding tokens get doc id -1)"
            )

    def positions(self, seq_len: int, rank: int) -> torch.Tensor:
        """Global index of each token held by ``rank``, increasing (LongTensor)."""
        self.check_seq_len(seq_len)
        if not 0 <= rank < self.cp_size:
            raise ValueError(f"rank must be in [0, {self.cp_size}), got {rank}")
        if self.name == "striped":
            return torch.arange(rank, seq_len, self.cp_size)
        chunk = seq_len // self.multiple
        if self.name == "contiguous":
            return torch.arange(rank * chunk, (rank + 1) * chunk)
        mirror = 2 * self.cp_size - 1 - rank  # zigzag: chunk r and its mirror image
        return torch.cat([torch.arange(rank * chunk, (rank + 1) * chunk),
                          torch.arange(mirror * chunk, (mirror + 1) * chunk)])

    def shard(self, x: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
        """The part of ``x`` (full sequence along ``dim``) that ``rank`` holds."""
        index = self.positions(x.shape[dim], rank).to(x.device)
        return x.index_select(dim, index)

    def unshard(self, shards: list[torch.Tensor], dim: int) -> torch.Tensor:
        """Inverse of ``shard``: the full tensor from every rank's shard, in rank order."""
        if len(shards) != self.cp_size:
            raise ValueError(f"unshard needs one shard per rank ({self.cp_size}), got {len(shards)}")
        seq_len = sum(shard.shape[dim] for shard in shards)
        order = torch.cat([self.positions(seq_len, rank) for rank in range(self.cp_size)])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(seq_len)
        return torch.cat(shards, dim=dim).index_select(dim, inverse.to(shards[0].device))


def get_layout(name: str, cp_size: int) -> Layout:
    """The layout called ``name`` over ``cp_size`` ranks ("contiguous" | "zigzag" | "striped")."""
    return Layout(name, cp_size)

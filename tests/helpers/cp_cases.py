"""The cases of the ring-family strategy tests (ring, tree, usp share them): layouts, causal or
not, MHA / GQA, one document, packed or padded documents, windows, batch rows, sub-groups."""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lctrain.attention.layouts import LAYOUT_NAMES, get_layout
from tests.helpers.shard import run_sharded

HEAD_DIM = 8
TOLERANCES = {"float64": dict(atol=1e-10, rtol=1e-10), "float32": dict(atol=1e-5, rtol=1e-5)}
DOC_LENGTHS = {  # boundaries inside shards and across shards for every layout and P <= 4
    "packed": [[5, 13, 7, 20, 3], [20, 28]],
    "padded": [[10, 8, -3, 21, -6], [-4, 30, -14]],  # negative: that many padding tokens
}


@dataclass(frozen=True)
class Case:
    layout: str
    causal: bool = True
    heads: tuple[int, int] = (4, 4)  # (h, h_kv)
    docs: str = "one"  # "one" | "packed" | "padded"
    window: int | None = None
    dtype: str = "float64"
    batch: int = 1
    seq: int = 48
    group_stride: int = 0  # > 0: rings over ranks {r, r + stride, ...} (world // stride groups)

    @property
    def name(self) -> str:
        causal = "causal" if self.causal else "full"
        heads = "mha" if self.heads[0] == self.heads[1] else f"gqa{self.heads[0]}x{self.heads[1]}"
        extra = f"-b{self.batch}" if self.batch > 1 else ""
        extra += f"-groups{self.group_stride}" if self.group_stride else ""
        return f"{self.layout}-{causal}-{heads}-{self.docs}-w{self.window}-{self.dtype}-s{self.seq}{extra}"


def cases_for(world: int) -> list[Case]:
    cases = []
    for layout in LAYOUT_NAMES:
        if 48 % get_layout(layout, world).multiple:
            continue
        for causal in (True, False):
            for heads in ((4, 4), (4, 2) if causal else (4, 1)):
                for docs in ("one", "packed"):
                    for window in (None, 7):
                        cases.append(Case(layout, causal, heads, docs, window))
        cases.append(Case(layout, True, (4, 2), "padded"))
        cases.append(Case(layout, False, (4, 4), "padded", window=9))
        cases.append(Case(layout, True, (4, 2), "packed", window=11, dtype="float32"))
        cases.append(Case(layout, True, (2, 1), "packed", batch=2))  # (b, s) coordinates
    if world == 4:
        cases += [Case(layout, True, (1, 1), "one", dtype="float32", seq=256) for layout in LAYOUT_NAMES]
        cases.append(Case("striped", True, (4, 2), "packed", group_stride=2))
    return cases


def doc_ids(case: Case) -> torch.Tensor:
    if case.docs == "one":
        return torch.zeros(case.seq, dtype=torch.long)
    rows = []
    for lengths in DOC_LENGTHS[case.docs][: case.batch]:
        ids = [torch.full((abs(n),), i if n > 0 else -1) for i, n in enumerate(lengths)]
        rows.append(torch.cat(ids))
    assert all(len(r) == case.seq for r in rows)
    return rows[0] if case.batch == 1 else torch.stack(rows)


def full_tensors(case: Case):
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    dtype = getattr(torch, case.dtype)
    h, h_kv = case.heads

    def rand(heads):
        return torch.randn(case.batch, case.seq, heads, HEAD_DIM, generator=gen, dtype=dtype)

    return rand(h), rand(h_kv), rand(h_kv), rand(h)


def ring_of(case: Case, world: int, rank: int) -> tuple[int, int]:
    """(ring size, index inside the ring) of ``rank``."""
    if not case.group_stride:
        return world, rank
    return world // case.group_stride, rank // case.group_stride


def strided_groups(rank: int, world: int, strides) -> dict:
    """stride -> this rank's group of ranks {r, r + stride, ...}; every rank creates every group."""
    groups = {}
    for stride in sorted(strides):
        for first in range(stride):
            ranks = list(range(first, world, stride))
            group = dist.new_group(ranks)
            if rank in ranks:
                groups[stride] = group
    return groups


def run_case(attention, case: Case, world: int, rank: int, groups: dict) -> dict:
    """This rank's results for ``case`` with ``attention`` over its (sub)group."""
    size, index = ring_of(case, world, rank)
    bound = functools.partial(attention, group=groups.get(case.group_stride))
    return run_sharded(bound, get_layout(case.layout, size), index, *full_tensors(case), doc_ids(case),
                       case.causal, case.window)

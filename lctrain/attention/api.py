"""build_attention: the one entry point the model's attention slot calls.

``strategy="none"`` is single-device attention through a local kernel; the
context-parallel strategies take this rank's shard of the sequence (as the
layout deals it) plus the global coordinates of its tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .checks import check_coords, check_qkv
from .counters import AttentionCounters
from .local_kernels import KERNEL_NAMES, check_kernel_name, resolve_kernel

STRATEGIES = ("none", "ring", "allgather", "ulysses", "usp", "tree")
KERNELS = KERNEL_NAMES


def check_attention_inputs(q, k, v, coords: dict[str, torch.Tensor | None], window) -> None:
    """Raise ValueError, naming the fix, for inputs the kernels cannot take."""
    check_qkv(q, k, v, window)
    check_coords(coords, q.shape[0], q.shape[1], required=False)


class LocalAttention:
    """Single-device attention (strategy "none") through one local kernel."""

    def __init__(self, kernel_name: str):
        self.kernel_name = kernel_name

    def __repr__(self) -> str:
        return f"LocalAttention(kernel_name={self.kernel_name!r})"

    def __call__(
        self, q, k, v, causal=True, doc_ids=None, window=None, positions=None, scale=None,
        return_lse=False,
    ):
        """q (b, s, h, d), k/v (b, s, h_kv, d) -> out (b, s, h, d) [and lse (b, h, s)].

        ``positions``: global position of each token, (s,) or (b, s), default
        arange(s); ``doc_ids``: same shapes, default one document, -1 = padding.
        """
        check_attention_inputs(q, k, v, {"positions": positions, "doc_ids": doc_ids}, window)
        seq_len = q.shape[1]
        if positions is None:
            positions = torch.arange(seq_len, device=q.device)
        if doc_ids is None:
            doc_ids = torch.zeros(seq_len, dtype=torch.long, device=q.device)
        positions, doc_ids = positions.to(q.device), doc_ids.to(q.device)
        kernel = resolve_kernel(self.kernel_name, q)
        out, lse = kernel.attention(q, k, v, positions, positions, doc_ids, doc_ids, causal, window, scale)
        return (out, lse) if return_lse else out


def _strategy_fn(strategy: str, query_chunk: int | None = None):
    # Imported here so each strategy module stays independent of the others.
    if strategy == "tree":
        from functools import partial

        from .tree import tree_attention

        return partial(tree_attention, query_chunk=query_chunk or None)
    if strategy == "ring":
        from .ring import ring_attention

        return ring_attention
    if strategy == "ulysses":
        from .ulysses import ulysses_attention

        return ulysses_attention
    if strategy == "usp":
        from .usp import usp_attention

        def usp(q, k, v, positions, doc_ids, groups, **kwargs):
            return usp_attention(q, k, v, positions, doc_ids, *groups, **kwargs)

        return usp
    from .allgather import allgather_attention

    return allgather_attention


class ContextParallelAttention:
    """A context-parallel strategy over ``group``; inputs are this rank's shard.

    ``counters`` accumulates the unmasked pairs computed and bytes/messages sent
    by this rank over calls (``counters.reset()`` to start afresh).
    """

    def __init__(self, strategy: str, layout, group, kernel_name: str, check_shapes: bool = True,
                 subgroups=None, query_chunk: int | None = None):
        self.strategy, self.layout, self.group, self.kernel_name = strategy, layout, group, kernel_name
        # usp communicates over its (ulysses, ring) subgroups; the others over the cp group.
        self.comm_group = subgroups if strategy == "usp" else group
        self.check_shapes = check_shapes
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        size = dist.get_world_size(group) if dist.is_initialized() else 1
        if layout.cp_size != size:
            raise ValueError(
                f"layout {layout.name!r} was built for cp_size={layout.cp_size} but the group has "
                f"{size} ranks; build it with get_layout({layout.name!r}, cp_size={size})"
            )
        self.counters = AttentionCounters()
        self._fn = _strategy_fn(strategy, query_chunk)

    def __repr__(self) -> str:
        return f"ContextParallelAttention({self.strategy!r}, layout={self.layout.name!r}, kernel={self.kernel_name!r})"

    def __call__(
        self, q, k, v, causal=True, doc_ids=None, window=None, positions=None, scale=None,
        return_lse=False,
    ):
        """Local shards q (b, s_local, h, d), k/v (b, s_local, h_kv, d) -> local out [, lse].

        ``positions``: global positions of the local tokens, default
        ``layout.positions(s_local * cp_size, rank)``; ``doc_ids``: their
        documents, default one document.
        """
        check_attention_inputs(q, k, v, {"positions": positions, "doc_ids": doc_ids}, window)
        if positions is None:
            seq_len = q.shape[1] * self.layout.cp_size
            positions = self.layout.positions(seq_len, self.rank)
        positions = positions.to(q.device)
        if doc_ids is None:
            doc_ids = torch.zeros_like(positions)
        doc_ids = doc_ids.to(q.device)
        if self.check_shapes:
            check_same_shapes_across_ranks(self.group, q, k, v, positions, doc_ids)
        out, lse = self._fn(q, k, v, positions, doc_ids, self.comm_group, causal=causal, window=window,
                            scale=scale, counters=self.counters, kernel=self.kernel_name)
        return (out, lse) if return_lse else out


def check_same_shapes_across_ranks(group, q, k, v, positions, doc_ids) -> None:
    """One small all-gather of every rank's shapes, so a rank whose shard
    differs fails with a ValueError naming it instead of hanging a P2P loop."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    dtypes = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    meta = torch.tensor([*q.shape, *k.shape, *v.shape, positions.dim(), doc_ids.dim(),
                         dtypes.index(q.dtype) if q.dtype in dtypes else -1], dtype=torch.long)
    gathered = [torch.empty_like(meta) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, meta, group=group)
    mine = dist.get_rank(group)
    differ = [r for r, other in enumerate(gathered) if not torch.equal(other, gathered[0])]
    if differ:
        raise ValueError(
            f"context-parallel ranks hold shards of different shapes/dtypes: group rank(s) {differ} differ "
            f"from rank 0 (this is rank {mine}: q {tuple(q.shape)}, k {tuple(k.shape)}, {q.dtype}); every "
            f"rank must pass its layout shard of the same sequence (pad to the layout's multiple). "
            f"Turn the check off with check_shapes=False / cp.check_shapes=false"
        )


def build_attention(strategy: str = "none", layout=None, group=None, kernel: str = "auto",
                    check_shapes: bool = True, subgroups=None, ulysses_size: int | None = None,
                    query_chunk: int | None = None):
    """The attention callable for ``strategy`` over ``layout`` / ``group`` with ``kernel``.

    strategy "none": single-device (layout and group must be None). "ring",
    "allgather", "ulysses" and "usp": context parallel over ``group`` (None = the default
    group) with the sequence dealt by ``layout`` (``get_layout(name, cp_size)``).
    "usp" also needs its (ulysses_group, ring_group): ``subgroups=
    build_parallel_groups(..., ulysses_size=U).usp_groups``, or, when ``group`` is None,
    ``ulysses_size=U`` builds them over the default group (every rank must call it).
    "tree": ``query_chunk`` bounds the gathered query tokens per rank held at once.
    """
    if strategy not in STRATEGIES:
        raise ValueError(
            f"unknown attention strategy {strategy!r}; available in this version: {', '.join(STRATEGIES)}"
        )
    kernel_name = check_kernel_name(kernel)
    if strategy == "none":
        if layout is not None or group is not None:
            raise ValueError(
                "strategy 'none' is single-device attention: pass layout=None and group=None"
            )
        return LocalAttention(kernel_name)
    if layout is None:
        raise ValueError(f"strategy {strategy!r} needs layout=get_layout(name, cp_size)")
    if strategy == "usp":
        subgroups = _usp_subgroups(layout, group, subgroups, ulysses_size)
    return ContextParallelAttention(strategy, layout, group, kernel_name, check_shapes, subgroups, query_chunk)


def _usp_subgroups(layout, group, subgroups, ulysses_size):
    if subgroups is not None:
        return subgroups
    if group is not None or ulysses_size is None:
        raise ValueError(
            "strategy 'usp' needs subgroups=build_parallel_groups(..., ulysses_size=U).usp_groups, "
            "or group=None with ulysses_size=U to factor the default group"
        )
    from lctrain.distributed.groups import build_parallel_groups

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if layout.cp_size != world:
        raise ValueError(f"layout cp_size={layout.cp_size} but the default group has {world} ranks")
    if world == 1:
        return None, None
    return build_parallel_groups(rank, world, 1, world, ulysses_size).usp_groups

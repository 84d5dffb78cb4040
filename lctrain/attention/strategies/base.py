"""What an attention strategy is, and the registry that ``build_attention`` looks names up in.

A strategy is a class registered under its name (``@register``). It says

- whether the ranks of a cp group hold layout shards of one sequence (``shards_sequence``);
- ``validate(cfg, world_size)``: its config rules, a ValueError naming the fix, before any
  process group exists; returns the data-parallel degree;
- ``build(...)``: the attention callable for a layout, a group and a local kernel;
- ``setup(cfg, env)``: everything the trainer needs from it on this rank (groups, layout,
  the ranks that hold model state, and for ranks that only serve attention, their loop).

Every attention callable takes this rank's ``q, k, v`` and the global ``Coords`` of its
tokens plus a ``Mask``, and returns ``out`` (and ``lse`` with ``return_lse=True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.distributed as dist

from lctrain.distributed.groups import ParallelGroups, build_parallel_groups
from lctrain_kernels.mask import CAUSAL, Coords, Mask

from ..checks import check_coords, check_qkv
from ..counters import AttentionCounters
from ..layouts import LAYOUT_NAMES, Layout, get_layout
from ..local_kernels import resolve_kernel

_REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` available as ``build_attention(strategy=cls.name)`` and ``cp=<name>``."""
    assert cls.name not in _REGISTRY, f"strategy {cls.name!r} registered twice"
    _REGISTRY[cls.name] = cls
    return cls


def strategy_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_strategy(name: str) -> Strategy:
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention strategy {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]()


@dataclass
class AttentionSetup:
    """What a strategy hands the trainer on this rank."""

    attention: Callable  # the model's attention slot
    groups: ParallelGroups  # dp / cp groups of this rank
    layout: Layout | None  # how a cp group deals one sequence; None: every rank holds whole sequences
    model_group: object = None  # ranks holding model state (gradients, loss, checkpoints); None: the world
    num_model_ranks: int = 1
    serve: Callable[[], int] | None = None  # ranks that only serve attention run this instead of training


class AttentionCall:
    """Base of every attention callable: the hooks the trainer calls, no-ops unless a strategy needs them."""

    counters: AttentionCounters | None = None

    def begin_step(self) -> None:
        """A new micro-batch starts: re-arm the once-per-step checks."""

    def finish(self) -> None:
        """The last attention call of the run is done (attention servers are released)."""

    def step_metrics(self) -> dict[str, float]:
        return {}


def _prepare(q, k, v, coords: Coords | None, default: Callable[[], Coords]) -> Coords:
    check_qkv(q, k, v)
    coords = default() if coords is None else coords
    check_coords(coords, q.shape[0], q.shape[1])
    return coords.to(q.device)


class LocalAttention(AttentionCall):
    """Single-device attention (strategy "none") through one local kernel."""

    def __init__(self, kernel_name: str, counters: AttentionCounters | None = None):
        self.kernel_name, self.counters = kernel_name, counters

    def __repr__(self) -> str:
        return f"LocalAttention(kernel_name={self.kernel_name!r})"

    def __call__(self, q, k, v, coords: Coords | None = None, mask: Mask = CAUSAL, scale=None, return_lse=False):
        """q (b, s, h, d), k/v (b, s, h_kv, d) -> out (b, s, h, d) [and lse (b, h, s)].

        ``coords``: global coordinates of the tokens, default positions 0..s-1 of one document.
        """
        coords = _prepare(q, k, v, coords, lambda: Coords.of_sequence(q.shape[1], q.device))
        out, lse = resolve_kernel(self.kernel_name, q).attention(q, k, v, coords, coords, mask, scale)
        if self.counters is not None:
            self.counters.add_pairs("forward", coords, coords, mask, q.shape[0])
        return (out, lse) if return_lse else out


class ContextParallelAttention(AttentionCall):
    """A strategy over a cp group; inputs are this rank's layout shard.

    ``counters`` (when built with ``count=True``) accumulates the unmasked pairs computed and
    bytes/messages sent by this rank over calls (``counters.reset()`` to start afresh).
    The shape check (one small all-gather) runs on the first call after construction and
    after each ``begin_step()``, so a rank whose shard differs fails with a ValueError naming
    it instead of hanging a collective, at no cost per layer.
    """

    def __init__(self, strategy: str, layout: Layout, group, kernel_name: str, attend: Callable,
                 counters: AttentionCounters | None, check_shapes: bool):
        self.strategy, self.layout, self.group, self.kernel_name = strategy, layout, group, kernel_name
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        size = dist.get_world_size(group) if dist.is_initialized() else 1
        if layout.cp_size != size:
            raise ValueError(
                f"layout {layout.name!r} was built for cp_size={layout.cp_size} but the group has "
                f"{size} ranks; build it with get_layout({layout.name!r}, cp_size={size})"
            )
        self._attend, self.counters = attend, counters
        self.check_shapes = self._armed = check_shapes

    def __repr__(self) -> str:
        return f"ContextParallelAttention({self.strategy!r}, layout={self.layout.name!r}, kernel={self.kernel_name!r})"

    def begin_step(self) -> None:
        self._armed = self.check_shapes

    def __call__(self, q, k, v, coords: Coords | None = None, mask: Mask = CAUSAL, scale=None, return_lse=False):
        """Local shards q (b, s_local, h, d), k/v (b, s_local, h_kv, d) -> local out [, lse].

        ``coords``: global coordinates of the local tokens, default the layout's positions of
        one document of ``s_local * cp_size`` tokens.
        """
        def default() -> Coords:
            pos = self.layout.positions(q.shape[1] * self.layout.cp_size, self.rank)
            return Coords(pos, torch.zeros_like(pos))

        coords = _prepare(q, k, v, coords, default)
        if self._armed:
            check_same_shapes_across_ranks(self.group, q, k, v, coords)
            self._armed = False
        out, lse = self._attend(q, k, v, coords, mask, scale, self.counters, self.kernel_name)
        return (out, lse) if return_lse else out


_WIRE_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def check_same_shapes_across_ranks(group, q, k, v, coords: Coords) -> None:
    """One small all-gather of every rank's shapes (on q's device, as NCCL needs), so a rank
    whose shard differs fails with a ValueError naming it instead of hanging a P2P loop."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    dtype = _WIRE_DTYPES.index(q.dtype) if q.dtype in _WIRE_DTYPES else -1
    meta = torch.tensor([*q.shape, *k.shape, *v.shape, coords.token_pos.dim(), coords.doc_ids.dim(), dtype],
                        dtype=torch.long, device=q.device)
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


class Strategy:
    """Base of the registered strategies; see the module docstring for the protocol."""

    name: ClassVar[str]
    shards_sequence: ClassVar[bool] = True  # ranks of a cp group hold layout shards of one sequence
    decodes: ClassVar[bool] = True  # usable as the prefill of sharded-cache decoding
    options: ClassVar[dict] = {}  # extra build options and their defaults

    # ------------------------------------------------------------------ config
    def validate(self, cfg, world_size: int) -> int:
        """Config rules of this strategy (ValueError naming the fix); returns the dp degree."""
        cp = cfg.cp
        if cp.layout not in LAYOUT_NAMES:
            raise ValueError(f"cp.layout={cp.layout!r} is not valid; use one of {list(LAYOUT_NAMES)}")
        if cp.size < 2:
            raise ValueError(f"cp.strategy={self.name} needs cp.size >= 2 (one rank is cp=none)")
        dp = check_world(cfg, world_size)
        multiple = get_layout(cp.layout, cp.size).multiple
        if cfg.data.seq_len < cp.size:
            raise ValueError(
                f"data.seq_len={cfg.data.seq_len} is shorter than cp.size={cp.size}: some cp rank would hold "
                f"only padding; use data.seq_len >= {cp.size} or a smaller cp.size"
            )
        if cp.padding == "none" and cfg.data.seq_len % multiple:
            raise ValueError(
                f"cp.layout={cp.layout} over cp.size={cp.size} deals sequences in multiples of {multiple}, "
                f"and data.seq_len={cfg.data.seq_len} is not one; set data.seq_len="
                f"{-(-cfg.data.seq_len // multiple) * multiple} or cp.padding=pad (masked padding tokens)"
            )
        return dp

    def config_options(self, cfg, groups: ParallelGroups) -> dict:
        """The build options this strategy reads from the config."""
        return {}

    def ulysses_size(self, cfg) -> int | None:
        """The Ulysses factor of the cp group, for strategies that split it (usp)."""
        return None

    # ------------------------------------------------------------------ building
    def attend(self, group, layout: Layout, **options) -> Callable:
        """``fn(q, k, v, coords, mask, scale, counters, kernel) -> (out, lse)`` over ``group``."""
        raise NotImplementedError

    def build(self, layout: Layout | None = None, group=None, kernel: str = "auto",
              counters: AttentionCounters | None = None, check_shapes: bool = True, **options) -> AttentionCall:
        unknown = set(options) - set(self.options)
        if unknown:
            raise ValueError(f"strategy {self.name!r} takes no option(s) {sorted(unknown)}; its options: "
                             f"{sorted(self.options) or 'none'}")
        if layout is None:
            raise ValueError(f"strategy {self.name!r} needs layout=get_layout(name, cp_size)")
        attend = self.attend(group, layout, **{**self.options, **options})
        return ContextParallelAttention(self.name, layout, group, kernel, attend, counters, check_shapes)

    def setup(self, cfg, env, counters: AttentionCounters | None = None) -> AttentionSetup:
        """Groups over the world (dp x cp, consecutive ranks share a sequence), the layout and
        the attention of this rank, from the typed config."""
        dp = self.validate(cfg, env.world_size)
        groups = build_parallel_groups(env.rank, env.world_size, dp, cfg.cp.size, self.ulysses_size(cfg))
        layout = get_layout(cfg.cp.layout, cfg.cp.size) if self.shards_sequence else None
        attention = self.build(layout, groups.cp_group, cfg.kernel.name, counters, cfg.cp.check_shapes,
                               **self.config_options(cfg, groups))
        return AttentionSetup(attention, groups, layout, None, env.world_size)


def check_world(cfg, world_size: int) -> int:
    """dp from ``trainer.dp`` (-1: world / cp); ValueError unless dp x cp is the world."""
    dp = cfg.trainer.dp if cfg.trainer.dp > 0 else world_size // cfg.cp.size
    if dp * cfg.cp.size != world_size:
        launch = max(dp, 1) * cfg.cp.size
        raise ValueError(
            f"world size {world_size} != dp ({dp}) x cp ({cfg.cp.size}); launch "
            f"{launch} processes (torchrun --nproc-per-node={launch}) or set trainer.dp=-1 "
            f"and a cp.size that divides {world_size}"
        )
    return dp

"""Strategy "none": every rank holds whole sequences; attention is one local-kernel call."""

from __future__ import annotations

from .base import AttentionCall, LocalAttention, Strategy, check_world, register


@register
class LocalStrategy(Strategy):
    name = "none"
    shards_sequence = False

    def validate(self, cfg, world_size: int) -> int:
        if cfg.cp.size != 1:
            raise ValueError(f"cp=none needs cp.size=1 (got {cfg.cp.size}); pick a cp strategy or set cp.size=1")
        return check_world(cfg, world_size)

    def build(self, layout=None, group=None, kernel: str = "auto", counters=None, check_shapes: bool = True,
              **options) -> AttentionCall:
        if layout is not None or group is not None:
            raise ValueError("strategy 'none' is single-device attention: pass layout=None and group=None")
        if options:
            raise ValueError(f"strategy 'none' takes no options, got {sorted(options)}")
        return LocalAttention(kernel, counters)

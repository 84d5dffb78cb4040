"""Strategy "disagg": core attention as token-level tasks on attention servers (DistCA).

Workers train data parallel on whole sequences (no cp group, no layout); every attention
call of every layer is cut into tasks that the servers compute (``lctrain.disagg``). In
``colocated`` mode every rank is a worker and a server; in ``dedicated`` mode the last
``disagg.num_servers`` ranks only serve: their ``AttentionSetup.serve`` runs the server loop
in place of training, and gradients, losses and checkpoints go over the worker group.
"""

from __future__ import annotations

import torch.distributed as dist

from lctrain.disagg.scheduler import MODES
from lctrain.distributed.groups import ParallelGroups

from .base import AttentionSetup, Strategy, register


@register
class DisaggStrategy(Strategy):
    name = "disagg"
    shards_sequence = False
    decodes = False
    options = {"mode": "colocated", "num_servers": None, "chunk_tokens": None, "timeout_s": 300.0,
               "max_docs": 256, "ping_pong": False}

    def validate(self, cfg, world_size: int) -> int:
        """The number of (data-parallel) worker ranks."""
        d = cfg.disagg
        if cfg.cp.size != 1:
            raise ValueError(f"cp=disagg keeps cp.size=1 (each worker holds whole sequences), got {cfg.cp.size}; "
                             f"set cp.size=1")
        if d.mode not in MODES:
            raise ValueError(f"disagg.mode={d.mode!r} is not valid; use one of {list(MODES)}, e.g. "
                             f"disagg.mode={MODES[0]}")
        if d.mode == "dedicated" and not 1 <= d.num_servers < world_size:
            raise ValueError(f"disagg.mode=dedicated needs 1 <= disagg.num_servers < world size ({world_size}), "
                             f"got {d.num_servers}; launch more processes or lower disagg.num_servers")
        if d.timeout_s <= 0 or d.max_docs < 1 or d.chunk_tokens < 0:
            raise ValueError(f"disagg: need timeout_s > 0, max_docs >= 1 and chunk_tokens >= 0 (0 = whole "
                             f"documents), got {d.timeout_s}, {d.max_docs}, {d.chunk_tokens}")
        workers = world_size - d.num_servers if d.mode == "dedicated" else world_size
        if cfg.trainer.dp > 0 and cfg.trainer.dp != workers:
            raise ValueError(f"cp=disagg trains data parallel over its {workers} worker ranks; set trainer.dp=-1 "
                             f"(got trainer.dp={cfg.trainer.dp})")
        return workers

    def build(self, layout=None, group=None, kernel: str = "auto", counters=None, check_shapes: bool = True,
              **options):
        """Attention servers over ``group`` (None: the world); every rank of it must call this."""
        # Imported here: lctrain.disagg builds on lctrain.attention's leaf modules, and this
        # module is imported while lctrain.attention initialises.
        from lctrain.disagg.attention import DisaggAttention
        from lctrain.disagg.runtime import DisaggRuntime

        unknown = set(options) - set(self.options)
        if unknown or layout is not None:
            raise ValueError(f"strategy 'disagg' takes no layout and only the options {sorted(self.options)}, "
                             f"got layout={layout!r} and {sorted(options)}")
        o = {**self.options, **options}
        runtime = DisaggRuntime(o["mode"], o["num_servers"], group, o["chunk_tokens"], o["timeout_s"],
                                o["max_docs"], kernel)
        return DisaggAttention(runtime, ping_pong=o["ping_pong"])

    def setup(self, cfg, env, counters=None) -> AttentionSetup:
        from lctrain.disagg.attention import serve

        d = cfg.disagg
        workers = self.validate(cfg, env.world_size)
        worker_group = None
        if d.mode == "dedicated" and env.backend is not None:
            worker_group = dist.new_group(list(range(workers)))
        attention = self.build(kernel=cfg.kernel.name, mode=d.mode,
                               num_servers=d.num_servers if d.mode == "dedicated" else None,
                               chunk_tokens=d.chunk_tokens or None, timeout_s=d.timeout_s, max_docs=d.max_docs,
                               ping_pong=d.ping_pong)
        is_worker = attention.runtime.is_worker
        groups = ParallelGroups(workers, 1, env.rank if is_worker else 0, 0, None)
        return AttentionSetup(attention, groups, None, worker_group, workers,
                              serve=None if is_worker else (lambda: serve(attention)))

"""Engines: how model state is held and gradients are reduced across the ranks of the model group.

``engine=ddp`` replicates the model and sums gradients with torch DistributedDataParallel
(bucketed, overlapped with the backward); ``engine=fsdp2`` shards parameters, gradients and
optimizer state over every rank of the model group (dp x cp flattened) with ``fully_shard``;
``engine=deepspeed`` runs DeepSpeed ZeRO stage 1 / 2 / 3 over every rank. ddp and fsdp2 keep the single-device model's module tree and parameter names, so checkpoints (DCP)
move between engines and world shapes. ``parallelize`` is the one place that turns the
single-device model into the engine's (see ``build_engine``).
"""

from __future__ import annotations

import torch.distributed as dist

from lctrain.engines.base import Engine, LocalEngine
from lctrain.engines.ddp import DDPEngine
from lctrain.engines.fsdp2 import FSDP2Engine


def _deepspeed_engine(*args):
    from lctrain.engines.deepspeed import DeepSpeedEngine  # imports deepspeed only when asked for

    return DeepSpeedEngine(*args)


ENGINES = {"ddp": DDPEngine, "fsdp2": FSDP2Engine, "deepspeed": _deepspeed_engine}


def build_engine(cfg, model, group, device, world: int) -> Engine:
    """The engine ``cfg.engine.name`` over ``group`` (``world`` ranks; None: the world) wrapped around
    the single-device ``model``. Activation checkpointing is the model's own (per block, inside
    its forward), so the order is fixed: checkpointing inside, the engine around it."""
    name = cfg.engine.name
    if name not in ENGINES:
        raise ValueError(f"unknown engine.name={name!r}; choose one of {', '.join(ENGINES)}")
    if world == 1 and not (name == "deepspeed" and dist.is_initialized()):
        return LocalEngine(model)  # nothing to reduce or shard (one deepspeed rank may still offload)
    return ENGINES[name](model, group, device, cfg)


__all__ = ["ENGINES", "DDPEngine", "Engine", "FSDP2Engine", "LocalEngine", "build_engine"]

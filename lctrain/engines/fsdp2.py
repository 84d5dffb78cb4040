"""engine=fsdp2: ``fully_shard`` every block, then the root, over the model group's ranks.

Parameters, gradients and AdamW state are sharded over all dp x cp ranks (the cp ranks hold the
same weights, so they shard them too, as in torchtitan). A block's weights are all-gathered
just before its forward (and again for its backward unless ``engine.reshard_after_forward`` is
false) and its gradients reduce-scattered right after its backward. The trainer's loss is
already normalised by the global token count, so the reduce-scatter must sum, not average:
the gradient divide factor is 1. Parameter names are unchanged, so DCP checkpoints reshard to
any other world shape or engine.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from lctrain.engines.base import Engine

PARAM_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class FSDP2Engine(Engine):
    name = "fsdp2"

    def __init__(self, model, group, device, cfg):
        super().__init__(model)
        ec = cfg.engine
        if ec.mixed_precision not in PARAM_DTYPES:
            raise ValueError(f"engine.mixed_precision={ec.mixed_precision!r}; choose one of {', '.join(PARAM_DTYPES)}")
        mesh = DeviceMesh.from_group(group if group is not None else dist.group.WORLD, device.type)
        options = {"mesh": mesh, "reshard_after_forward": ec.reshard_after_forward,
                   "mp_policy": MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[ec.mixed_precision],
                                                     reduce_dtype=torch.float32 if ec.mixed_precision != "none"
                                                     else None)}
        if ec.cpu_offload:
            options["offload_policy"] = CPUOffloadPolicy()
        for block in model.layers:
            fully_shard(block, **options)
        # The root (embeddings, final norm, the tied output weight) stays gathered after its forward:
        # the loss and eval read the output weight outside the forward (the backward needs it next).
        fully_shard(model, **{**options, "reshard_after_forward": False})
        for module in (model, *model.layers):
            module.set_gradient_divide_factor(1.0)  # sum: the loss is already globally normalised
            if hasattr(module, "set_force_sum_reduction_for_comms"):
                module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)

    def accumulate(self, last: bool):
        self.model.set_requires_gradient_sync(last)
        return super().accumulate(last)

    def local_grads(self) -> list[torch.Tensor]:
        return [p.grad.to_local() for p in self.model.parameters() if p.grad is not None]

    def clip_grad_norm(self, max_norm: float) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        total = torch.nn.utils.get_total_norm([p.grad for p in params])
        total = total.full_tensor() if hasattr(total, "full_tensor") else total  # the norm over every shard
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return float(total)

"""engine=ddp: torch DistributedDataParallel over the model group, gradients summed.

The trainer divides every rank's loss by the token count of the whole global batch, so the
exact gradient of the global mean loss is the *sum* of the ranks' gradients: a communication
hook sums DDP's buckets instead of averaging them (no rescaling, exact in float64). DDP's
buckets are all-reduced while the backward is still running, overlapping the cp collectives
of the attention, which run on their own groups.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lctrain.engines.base import Engine


def _sum_buckets(group, bucket):  # no annotations: DDP compares them as objects, not strings
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class DDPEngine(Engine):
    name = "ddp"

    def __init__(self, model, group, device, cfg):
        super().__init__(model)
        # Every rank built the same weights from the same seed; DDP checks the shapes and
        # broadcasts rank 0's values anyway.
        self.module = DistributedDataParallel(
            model, process_group=group, device_ids=[device.index] if device.type == "cuda" else None,
            bucket_cap_mb=cfg.engine.bucket_mb, gradient_as_bucket_view=True)
        self.module.register_comm_hook(group, _sum_buckets)

    @contextmanager
    def accumulate(self, last: bool):
        if last:
            yield
        else:
            with self.module.no_sync():
                yield

"""AdamW with linear warmup and cosine decay to ``min_lr_ratio`` of the peak."""

from __future__ import annotations

import math

import torch


def lr_lambda(warmup: int, total: int, min_ratio: float):
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return fn


def build_optimizer(model: torch.nn.Module, optim, total_steps: int):
    """(optimizer, scheduler) of an ``OptimConfig`` over ``total_steps``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                  weight_decay=optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim.warmup_steps, total_steps,
                                                                       optim.min_lr_ratio))
    return optimizer, scheduler

"""What the trainer asks of an engine (one rank's view)."""

from __future__ import annotations

from contextlib import contextmanager

import torch


class Engine:
    """``module`` runs the forward (the model, or a wrapper of it); ``model`` is the single-device
    module tree (its state dict is the checkpoint's, with the same names under every engine)."""

    name = "local"
    skips_nonfinite = False  # True: the engine's own step skips non-finite gradients (deepspeed)

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.module = model
        self.measured = None  # ``state_bytes`` as of the first optimizer step

    def attach(self, optimizer, scheduler):
        """The optimizer and schedule the trainer steps through (an engine may wrap them)."""
        return optimizer, scheduler

    def call(self, fn, *args):
        """``fn(forward, *args)``: one forward of the model (through the engine) and whatever reads
        the model's weights after it (the loss reads the output weight)."""
        return fn(self.module, *args)

    def call_eval(self, fn, *args):
        """``call`` without gradients: the bare model (no DDP bucket or buffer traffic)."""
        return fn(self.model, *args)

    @contextmanager
    def accumulate(self, last: bool):
        """Around one micro batch's forward and backward: gradients are reduced on the last only."""
        yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def local_grads(self) -> list[torch.Tensor]:
        """This rank's gradient tensors (its shards under a sharding engine), for finiteness checks."""
        return [p.grad for p in self.model.parameters() if p.grad is not None]

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip the (reduced) gradients to ``max_norm`` in place; the global norm before clipping."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def optimizer_step(self, optimizer, scheduler, max_norm: float) -> float:
        """Clip, step, zero the gradients, advance the schedule; the global norm before clipping."""
        norm = self.clip_grad_norm(max_norm)
        optimizer.step()
        if self.measured is None:  # gradients and optimizer state both exist now
            self.measured = self.state_bytes(optimizer)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return norm

    def state_bytes(self, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        """Bytes this rank holds for parameters, gradients and optimizer state (local shards)."""
        def size(t) -> int:
            t = t.to_local() if hasattr(t, "to_local") else t
            return t.numel() * t.element_size()

        params = list(self.model.parameters())
        return {"params": sum(size(p) for p in params),
                "grads": sum(size(p.grad) for p in params if p.grad is not None),
                "optimizer": sum(size(v) for s in optimizer.state.values() for v in s.values()
                                 if isinstance(v, torch.Tensor))}


class LocalEngine(Engine):
    """One rank holds the model alone: nothing to reduce."""

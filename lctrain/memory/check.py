"""The start-up fit check: the estimate against the memory this rank can use, before anything
is allocated, with the knobs that would make the step fit."""

from __future__ import annotations

import torch

from lctrain.memory.model import MemoryEstimate, estimate, fitting_knobs


def device_capacity(device: torch.device, local_ranks: int) -> int:
    """Bytes one rank may use: its GPU's memory, or on CPU this host's memory shared by its ranks
    (MemTotal, not MemAvailable: every rank must reach the same verdict)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo") as f:
            total_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        return 0  # unknown: nothing to check against
    return total_kib * 1024 // max(1, local_ranks)


def check_fits(cfg, world: int, device: torch.device, local_ranks: int,
               distributed: bool = True) -> tuple[MemoryEstimate, int]:
    """(estimate, capacity) for ``world`` ranks holding the model; a ValueError naming the knobs that
    fit when the estimate exceeds the capacity (``trainer.memory_check=false`` to run anyway). The
    capacity is the whole device: the check refuses what cannot fit, it does not keep a reserve."""
    est = estimate(cfg, world, device.type, distributed)
    capacity = device_capacity(device, local_ranks)
    if capacity and cfg.trainer.memory_check and est.peak > capacity:
        knobs = fitting_knobs(cfg, world, device.type, capacity, distributed)
        hint = ("; each of these fits: " + " | ".join(knobs)) if knobs else \
            "; no activation or engine knob alone fits: use more ranks (a larger cp.size) or a smaller data.seq_len"
        raise ValueError(
            f"the step needs about {est.peak / 2**30:.1f} GiB per rank (estimate, peak at {est.peak_phase}: params "
            f"{est.params / 2**30:.1f}, grads {est.grads / 2**30:.1f}, optimizer {est.optimizer / 2**30:.1f}, "
            f"activations {est.activations / 2**30:.1f}, transient {est.transient / 2**30:.1f}) but a rank has "
            f"{capacity / 2**30:.1f} GiB{hint}; trainer.memory_check=false runs it anyway")
    return est, capacity

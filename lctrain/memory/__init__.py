"""Memory of a training step: the per-rank model (``estimate``), the start-up fit check
(``check_fits``) and the profiler-based measurement the model is validated against."""

from lctrain.memory.check import check_fits, device_capacity
from lctrain.memory.model import MemoryEstimate, estimate, fitting_knobs, tokens_per_rank

__all__ = ["MemoryEstimate", "check_fits", "device_capacity", "estimate", "fitting_knobs", "tokens_per_rank"]

"""Peak bytes of live tensors over a span of code, from the PyTorch profiler's allocation events.

Works on any device the profiler tracks (CPU included, where there is no allocator counter):
every allocation and free inside the span is an event with a signed byte count, so the running
sum is the bytes allocated since the span began and its maximum is the span's peak. What was
alive before the span is not in it: the trainer opens it once the engine holds the model and
adds those bytes, counted tensor by tensor (``held_bytes``). The profiler sees the calling
thread only, so a tensor whose last reference dies on a communication thread (gloo's) would
never leave the running sum; set-up's collectives (DDP's weight broadcast) do that, which is
why the span opens after them. The profiler records every operator too, so this is a
measurement mode (``trainer.memory_profile=true``), never the hot path.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class MemorySpan:
    """``with MemorySpan(device_type) as span: ...`` then ``span.peak_bytes`` / ``span.end_bytes``."""

    def __init__(self, device_type: str = "cpu"):
        from torch.profiler import ProfilerActivity

        self.device_type = device_type
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
        self._profiler = torch.profiler.profile(activities=activities, profile_memory=True, record_shapes=False,
                                                with_stack=False)
        self.peak_bytes = 0
        self.end_bytes = 0
        self._phases: list[tuple[int, int, str]] = []  # (start, end, name), filled on exit
        self._curve: list[tuple[int, int]] = []  # (time, live bytes since the span began)

    def __enter__(self) -> "MemorySpan":
        self._profiler.__enter__()
        return self

    @contextmanager
    def phase(self, name: str):
        """Name a part of the span: ``peak_in(name)`` is the peak reached inside it."""
        with torch.profiler.record_function(f"lctrain_memory::{name}"):
            yield

    def __exit__(self, *exc) -> None:
        self._profiler.__exit__(*exc)
        if exc[0] is not None:
            return
        events = self._profiler.profiler.kineto_results.events()
        wanted = _device_code(self.device_type)
        allocations = sorted((e.start_ns(), e.nbytes()) for e in events
                             if e.name() == "[memory]" and e.device_type() == wanted)
        self._phases = sorted((e.start_ns(), e.start_ns() + e.duration_ns(), e.name().split("::", 1)[1])
                              for e in events if e.name().startswith("lctrain_memory::"))
        running = peak = 0
        self._curve = []
        for t, nbytes in allocations:
            running += nbytes
            peak = max(peak, running)
            self._curve.append((t, running))
        self.peak_bytes, self.end_bytes = peak, running

    def phase_names(self) -> list[str]:
        return list(dict.fromkeys(name for _, _, name in self._phases))

    def peak_in(self, name: str) -> int:
        """Peak of live bytes (since the span began) while phase ``name`` ran (its last run)."""
        spans = [(a, b) for a, b, n in self._phases if n == name]
        if not spans:
            raise KeyError(f"no phase {name!r} in this span")
        start, end = spans[-1]
        before = [v for t, v in self._curve if t < start]
        inside = [v for t, v in self._curve if start <= t <= end]
        return max(inside + before[-1:] or [0])


def _device_code(device_type: str):
    from torch._C._autograd import DeviceType

    return DeviceType.CUDA if device_type == "cuda" else DeviceType.CPU


def held_bytes(model: torch.nn.Module, engine_grad_buffers: bool) -> int:
    """Bytes of the distinct storages behind ``model``'s parameters and buffers (their local shards
    under a sharding engine), plus, with ``engine_grad_buffers``, gradient buffers the engine
    allocated up front (DDP's buckets, one gradient-sized view per parameter)."""
    seen = {}
    for t in (*model.parameters(), *model.buffers()):
        t = t.to_local() if hasattr(t, "to_local") else t
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return sum(seen.values()) + (grads if engine_grad_buffers else 0)

"""Stopping cleanly when asked: a signal (SIGTERM / SIGUSR1 by default) or a wall-time limit.

A handler only records the request; the trainer asks every rank after each step whether any
rank was asked (one tiny all-reduce), so all ranks stop after the same step, write a
checkpoint of it and exit with ``EXIT_STOPPED``. Clusters send SIGTERM before killing a job
(SLURM at its time limit or on preemption, Kubernetes on eviction, torchrun to its workers when
it is itself terminated); ``launch/slurm.sbatch`` asks for SIGUSR1 ahead of the time limit.
"""

from __future__ import annotations

import signal
import time

from lctrain.distributed import all_ranks_flag, gather_strings

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request after saving the current step; rerun to resume


def signal_numbers(names) -> list[signal.Signals]:
    """``["SIGTERM", "USR1", ...]`` -> signals; ValueError naming a bad one."""
    found = []
    for name in names:
        key = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
        if not hasattr(signal.Signals, key):
            raise ValueError(f"trainer.stop_signals: {name!r} is not a signal; use names like SIGTERM or SIGUSR1")
        found.append(signal.Signals[key])
    return found


class StopRequests:
    """Records stop requests of this rank; ``agreed`` asks every rank."""

    def __init__(self, signal_names, max_wall_s: float = 0.0):
        self.reason: str | None = None
        self.deadline = time.monotonic() + max_wall_s if max_wall_s > 0 else None
        self.max_wall_s = max_wall_s
        self._previous = {}
        for sig in signal_numbers(signal_names):
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        self.reason = self.reason or signal.Signals(signum).name

    def local(self) -> str | None:
        if self.reason is None and self.deadline is not None and time.monotonic() >= self.deadline:
            self.reason = f"trainer.max_wall_s={self.max_wall_s:g} reached"
        return self.reason

    def agreed(self, device, group=None) -> str | None:
        """The reason to stop now if any rank of ``group`` was asked (the first such rank's, e.g.
        "SIGTERM"), else None; every rank calls it after every step: one tiny all-reduce."""
        if not all_ranks_flag(self.local() is not None, device, group):
            return None
        return next(r for r in gather_strings(self.local() or "", device, group) if r)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

"""Failing fast and by name when a rank stalls, and never outliving the launcher.

- Collective timeouts: process groups start with ``trainer.first_step_timeout_s`` (a first
  step may compile kernels or load data for long) and drop to ``trainer.comm_timeout_s``
  after it, so a rank that stops answering fails its peers' next collective within that time
  instead of gloo's / NCCL's default 30 minutes.
- Heartbeats: a daemon thread per rank writes ``time step pid host`` into the job's store
  every ``interval_s``; when a collective times out, the rank reads them and names the ranks
  whose heartbeat stopped (stalled, stopped or dead) instead of a bare "timed out", and ends
  those on its own host (SIGKILL: a stopped process ignores the launcher's SIGTERM, which
  would otherwise hold the failing job for the launcher's grace period).
- Parent death: under torchrun a worker asks the kernel for SIGTERM when its agent dies
  (Linux ``PR_SET_PDEATHSIG``), so ``kill -9`` of the agent leaves no orphan training on.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import threading
import time
from datetime import timedelta

import torch.distributed as dist

PR_SET_PDEATHSIG = 1


def exit_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies (Linux; a no-op elsewhere)."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)


def set_timeout(seconds: float, groups) -> None:
    """Collective timeout of the default group and of ``groups`` (None entries skipped), and of
    the point-to-point waits of ``lctrain.distributed.comm``."""
    from lctrain.distributed.comm import set_p2p_timeout

    timeout = timedelta(seconds=seconds)
    for group in [None, *(g for g in groups if g is not None)]:
        dist.distributed_c10d._set_pg_timeout(timeout, group)
    set_p2p_timeout(seconds)


def is_timeout(err: BaseException) -> bool:
    text = str(err).lower()
    return "timed out" in text or "timeout" in text


class Heartbeat:
    """This rank's liveness in the job's store; ``stalled()`` names the ranks that went quiet."""

    def __init__(self, rank: int, world: int, interval_s: float = 2.0):
        self.rank, self.world, self.interval_s = rank, world, interval_s
        self.step = 0
        self.store = None
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if world > 1 and addr and port:
            # Its own client connection: the thread never shares a socket with the process group.
            client = dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=30))
            self.store = dist.PrefixStore("lctrain/heartbeat/", client)
            self._stop = threading.Event()
            self._beat()
            threading.Thread(target=self._run, name="lctrain-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        self.store.set(str(self.rank), f"{time.time():.3f} {self.step} {os.getpid()} {socket.gethostname()}")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
            except Exception:  # the store went away: the job is ending
                return

    def stalled(self, end_local: bool = True) -> dict[int, tuple[float, int]]:
        """rank -> (seconds since its last heartbeat, the step it last reported) for ranks quiet
        for over three intervals ({} when the store cannot be read); with ``end_local`` the quiet
        ranks on this host are sent SIGKILL."""
        if self.store is None:
            return {}
        quiet, now = {}, time.time()
        try:
            self.store.set_timeout(timedelta(seconds=5))
            beats = {rank: self.store.get(str(rank)).decode().split() for rank in range(self.world)}
        except Exception:
            return {}
        for rank, (stamp, step, pid, host) in beats.items():
            if rank != self.rank and now - float(stamp) > 3 * self.interval_s:
                quiet[rank] = (now - float(stamp), int(step))
                if end_local and host == socket.gethostname():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except OSError:
                        pass
        return quiet

    def close(self) -> None:
        if self.store is not None:
            self._stop.set()

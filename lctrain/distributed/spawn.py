"""Spawn local torch.distributed process groups (gloo on CPU) for tests, benchmarks and notebooks.

`run_ranks(fn, world_size, *args)` runs fn(rank, world_size, *args) in one
process per rank and returns the per-rank return values; an exception on any
rank fails the test with that rank's traceback, and a hang fails on a timeout
instead of blocking the suite. A test whose rank is meant to hang (a stalled
peer) passes ``ranks=``, the ranks to wait for: the others are killed once
those have reported, and their results are None.
"""

from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    """A free TCP port on the loopback interface (the ranks rendezvous on 127.0.0.1 only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, queue, wait_at_exit):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    finished = False
    try:
        queue.put((rank, "ok", fn(rank, world_size, *args)))
        finished = True
    except BaseException:  # report every failure to the parent, never hang it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        from lctrain.distributed.setup import shutdown_distributed

        shutdown_distributed(wait_for_peers=finished and wait_at_exit)


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0, ranks=None, join_timeout: float = 30.0):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    # Ranks wait for each other before leaving the group, unless some are meant to hang.
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue, ranks is None))
             for r in range(world_size)]
    for p in procs:
        p.start()
    waited = set(range(world_size) if ranks is None else ranks)
    results, errors = {}, {}
    try:
        while not waited <= results.keys() | errors.keys():
            rank, status, value = queue.get(timeout=timeout)
            (results if status == "ok" else errors)[rank] = value
    finally:
        for r, p in enumerate(procs):
            p.join(timeout=join_timeout if r in waited else 0)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))
    return [results.get(r) for r in range(world_size)]

"""Deterministic assignment of attention tasks to servers, minimising the busiest server's work.

Every rank runs ``schedule`` on the same gathered metadata and must reach the
same plan without talking, so the plan is a pure function of its inputs:
tasks are ordered by (cost desc, task fields), ties between servers go to the
lowest index, and nothing depends on dict or set order or on randomness.

Algorithm (greedy water-filling, milliseconds for thousands of tasks), with
capacity = floor(mean server load * ``target_imbalance``):

1. Colocated mode: each worker keeps its own tasks, most expensive first,
   while they fit under capacity, and of a task that does not fit keeps the
   longest query prefix that does (kept work moves no bytes).
2. The rest go most expensive first to the least-loaded server (LPT), ties
   broken by bytes moved (a task's own worker moves none), then by index. A
   task that would overflow the server is cut: the server gets the largest
   query prefix or suffix that fits (whichever moves fewer bytes per pair) and
   the remainder goes back into the queue. Cutting only at capacity keeps
   pieces as large as possible, so few K/V prefixes are copied: every piece of
   a causal document carries its own prefix keys.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

from .tasks import DEFAULT_CHUNK_TOKENS, AttentionTask, cut_to_cost, make_tasks, task_cost

MODES = ("colocated", "dedicated")


@dataclass(frozen=True)
class AttentionShape:
    """Per-token sizes of what a task moves: q, k, v to the server; out, lse back."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 2  # q, k, v, out (bf16)
    lse_bytes: int = 4  # lse is float32

    def task_bytes(self, task: AttentionTask) -> dict[str, int]:
        q_token = self.num_heads * self.head_dim * self.dtype_bytes
        kv_token = self.num_kv_heads * self.head_dim * self.dtype_bytes
        return {"q": task.q_len * q_token, "k": task.kv_len * kv_token, "v": task.kv_len * kv_token,
                "out": task.q_len * q_token, "lse": task.q_len * self.num_heads * self.lse_bytes}


@dataclass(frozen=True)
class ScheduledTask:
    task_id: int  # unique over the plan: the document id of the task in the server's rebatched call
    task: AttentionTask
    server: int  # rank of the server that computes it
    cost: int  # visible (query, key) pairs


@dataclass(frozen=True)
class SchedulePlan:
    """Who computes what, with the predicted work and traffic of every rank."""

    mode: str
    num_workers: int
    server_ranks: tuple[int, ...]  # colocated: the workers; dedicated: num_workers .. num_workers + K - 1
    tasks: tuple[ScheduledTask, ...]  # sorted by task_id = (worker, doc, q_start) order
    server_loads: tuple[int, ...]  # visible pairs per server, in server_ranks order
    bytes_sent: tuple[int, ...]  # per rank (workers, then dedicated servers): q/k/v out, out/lse back
    bytes_received: tuple[int, ...]

    @property
    def mean_load(self) -> float:
        return sum(self.server_loads) / len(self.server_loads)

    @property
    def imbalance(self) -> float:
        """max/mean server load: how much slower than a perfect split the busiest server is."""
        mean = self.mean_load
        return max(self.server_loads) / mean if mean > 0 else 1.0

    @property
    def bytes_moved(self) -> int:
        return sum(self.bytes_sent)


def _assign(tasks: list[AttentionTask], num_workers: int, server_ranks: tuple[int, ...], colocated: bool,
            capacity: int, split: bool, causal: bool, window: int | None, min_chunk_tokens: int,
            shape: AttentionShape) -> list[tuple[AttentionTask, int]]:
    """(task or piece, server index) pairs; see the module docstring."""
    def cost(task: AttentionTask) -> int:
        return task_cost(task, causal, window)

    def pairs_per_byte(task: AttentionTask) -> float:
        return cost(task) / sum(shape.task_bytes(task).values())

    loads = [0] * len(server_ranks)
    placed: list[tuple[AttentionTask, int]] = []

    def place(task: AttentionTask, server: int) -> None:
        loads[server] += cost(task)
        placed.append((task, server))

    queue = [(-cost(t), t) for t in tasks]
    if colocated:
        leftovers = []
        for negative_cost, task in sorted(queue):
            home = task.worker
            if -negative_cost <= capacity - loads[home]:
                place(task, home)
                continue
            kept, rest = cut_to_cost(task, capacity - loads[home], causal, window, False, min_chunk_tokens) \
                if split else (None, task)
            if kept is not None:
                place(kept, home)
            leftovers.append((-cost(rest), rest))
        queue = leftovers
    heapq.heapify(queue)
    while queue:
        negative_cost, task = heapq.heappop(queue)
        server = min(range(len(server_ranks)), key=lambda s: (loads[s], server_ranks[s] != task.worker, s))
        room = capacity - loads[server]
        if split and -negative_cost > room:
            cuts = [cut_to_cost(task, room, causal, window, from_end, min_chunk_tokens) for from_end in (False, True)]
            cuts = [c for c in cuts if c[0] is not None]
            if cuts:
                piece, rest = max(cuts, key=lambda c: pairs_per_byte(c[0]))  # max keeps the first on ties
                place(piece, server)
                heapq.heappush(queue, (-cost(rest), rest))
                continue
        place(task, server)  # fits, or cannot be cut small enough: plain LPT
    return placed


def _build_plan(mode, num_workers, server_ranks, placed, costs, shape) -> SchedulePlan:
    num_ranks = num_workers + (len(server_ranks) if mode == "dedicated" else 0)
    sent, received = [0] * num_ranks, [0] * num_ranks
    loads = [0] * len(server_ranks)
    scheduled = []
    for task_id, i in enumerate(sorted(range(len(placed)), key=lambda i: placed[i][0])):
        task, server_index = placed[i]
        server = server_ranks[server_index]
        loads[server_index] += costs[i]
        scheduled.append(ScheduledTask(task_id, task, server, costs[i]))
        if server != task.worker:
            nbytes = shape.task_bytes(task)
            forward, back = nbytes["q"] + nbytes["k"] + nbytes["v"], nbytes["out"] + nbytes["lse"]
            sent[task.worker] += forward
            received[server] += forward
            sent[server] += back
            received[task.worker] += back
    return SchedulePlan(mode, num_workers, server_ranks, tuple(scheduled), tuple(loads), tuple(sent),
                        tuple(received))


def schedule(tasks: Sequence[AttentionTask], num_workers: int, shape: AttentionShape, *,
             mode: str = "colocated", num_servers: int | None = None, causal: bool = True,
             window: int | None = None, target_imbalance: float = 1.05, split: bool = True,
             min_chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> SchedulePlan:
    """Plan for all workers' tasks on the servers of ``mode``.

    colocated: the servers are the worker ranks 0..num_workers-1 (``num_servers``
    must be None or num_workers). dedicated: ``num_servers`` extra ranks
    num_workers..num_workers+K-1 that hold no data, so every task moves.
    With ``split`` tasks are cut (on ``min_chunk_tokens`` multiples) where a
    server would exceed ``target_imbalance``; without, it is plain LPT. The plan
    misses the target only when uncuttable tasks are too coarse.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "colocated":
        if num_servers not in (None, num_workers):
            raise ValueError(f"colocated mode uses the {num_workers} workers as servers; "
                             f"got num_servers={num_servers} (use mode='dedicated' for extra servers)")
        server_ranks = tuple(range(num_workers))
    else:
        if num_servers is None or num_servers < 1:
            raise ValueError(f"dedicated mode needs num_servers >= 1, got {num_servers}")
        server_ranks = tuple(range(num_workers, num_workers + num_servers))
    if target_imbalance < 1.0:
        raise ValueError(f"target_imbalance is max/mean and must be >= 1.0, got {target_imbalance}")
    bad = sorted({t.worker for t in tasks if not 0 <= t.worker < num_workers})
    if bad:
        raise ValueError(f"tasks name workers {bad} outside 0..{num_workers - 1}")

    total = sum(task_cost(t, causal, window) for t in tasks)
    capacity = math.floor(total / len(server_ranks) * target_imbalance)
    placed = _assign(sorted(tasks), num_workers, server_ranks, mode == "colocated", capacity, split, causal,
                     window, min_chunk_tokens, shape)
    costs = [task_cost(t, causal, window) for t, _ in placed]
    return _build_plan(mode, num_workers, server_ranks, placed, costs, shape)


def plan_from_lengths(doc_lengths_per_worker: Sequence[Sequence[int]], shape: AttentionShape, *,
                      chunk_tokens: int | None = None, causal: bool = True, window: int | None = None,
                      **schedule_kwargs) -> SchedulePlan:
    """The plan every rank computes from the gathered per-worker document lengths.

    ``chunk_tokens=None`` starts from whole documents and lets the scheduler
    split only what balance needs (fewest K/V copies); an int pre-cuts every
    document into chunks of that many queries.
    """
    tasks = [t for worker, lengths in enumerate(doc_lengths_per_worker)
             for t in make_tasks(lengths, worker, causal, window, chunk_tokens)]
    return schedule(tasks, len(doc_lengths_per_worker), shape, causal=causal, window=window, **schedule_kwargs)

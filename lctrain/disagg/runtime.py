"""The collective half of attention servers: one exchange per attention call, on workers and servers alike.

Every call runs the same collectives on every rank of the disagg group, in the same order
(each message's layout: ``protocol``):

1. control: a fixed-width int64 all-gather (opcode, slot, call settings, the worker's
   document lengths) on the control group; servers send IDLE;
2. every rank computes the same plan (``plan_from_lengths``) from the gathered lengths;
3. task headers (int64) and requests (q/k/v[, dout, lse, delta]) by ``all_to_all_single``
   with variable splits on the slot's group; servers validate the headers against their plan;
4. servers rebatch every received task into one kernel call and send back a status and
   (out, lse) or (dq, dk, dv) with a second all-to-all.

A server that rejects a request (malformed headers) or fails computing it aborts: it
sends the call's results with an error status (workers collecting that call fail), and
a dedicated server then sends ABORT as its control row (workers that begin another call
first, as ping-pong does, fail there), so workers fail at once naming the server and
the culprit rank instead of waiting out ``timeout_s``.

Two slots (process groups) let two half-batches be in flight at once (ping-pong): the
control group orders calls, and each slot group orders its own request/result pair, so
a server can answer slot A and take slot B's call before the workers collect slot A.
Servers keep no state across calls (backward recomputes from what the worker sends).
"""

from __future__ import annotations

import time
from collections import OrderedDict, defaultdict
from datetime import timedelta

import torch
import torch.distributed as dist

from lctrain.attention.counters import AttentionCounters
from lctrain.attention.local_kernels import LocalKernel, resolve_kernel

from .exchange import Call
from .protocol import (
    BACKWARD,
    FORWARD,
    MALFORMED,
    NUM_SLOTS,
    OPCODES,
    STOP,
    STOP_CALL,
    CallSpec,
    abort_row,
    control_row,
    parse_control,
    read_abort,
)
from .scheduler import MODES, AttentionShape, plan_from_lengths


class DisaggServerError(RuntimeError):
    """An exchange with the attention servers failed: a server died, stalled past the timeout, or erred."""


class DisaggRuntime:
    """This rank's role and process groups, the plan cache, counters and timers."""

    def __init__(self, mode: str = "colocated", num_servers: int | None = None, group=None,
                 chunk_tokens: int | None = None, timeout_s: float = 300.0, max_docs: int = 256,
                 kernel: str = "torch"):
        """``kernel``: the local kernel servers compute tasks with ("torch", "triton", "auto")."""
        if mode not in MODES:
            raise ValueError(f"disagg mode must be one of {MODES}, got {mode!r}")
        if not dist.is_initialized():
            raise ValueError("attention servers need a torch.distributed process group: launch with torchrun "
                             "(or call init_process_group) before building disagg attention")
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        self.size, self.rank = len(ranks), dist.get_rank(group)
        if mode == "dedicated" and not (num_servers and 1 <= num_servers < self.size):
            raise ValueError(f"disagg.mode=dedicated needs 1 <= disagg.num_servers < {self.size} (the world "
                             f"size), got {num_servers}; the last num_servers ranks serve attention")
        self.mode, self.chunk_tokens, self.timeout_s, self.max_docs = mode, chunk_tokens, timeout_s, max_docs
        self.kernel = kernel
        self.num_servers = num_servers if mode == "dedicated" else self.size
        self.num_workers = self.size - num_servers if mode == "dedicated" else self.size
        self.server_ranks = list(range(self.num_workers, self.size)) if mode == "dedicated" else list(range(self.size))
        self.is_worker = self.rank < self.num_workers
        self.is_server = self.rank in self.server_ranks
        # Own groups with their own timeout: a dead or stalled peer fails a pending op, never hangs it.
        timeout = timedelta(seconds=timeout_s)
        self.control = dist.new_group(ranks, timeout=timeout)
        self.slots = [dist.new_group(ranks, timeout=timeout) for _ in range(NUM_SLOTS)]
        self.counters = AttentionCounters()
        self.timers: dict[str, float] = defaultdict(float)
        self._plans: OrderedDict = OrderedDict()
        self._server_works: list[list] = [[] for _ in range(NUM_SLOTS)]
        self._abort = None  # (status, culprit, result send) of a call this pure server aborted
        self.stopped = False

    def __repr__(self) -> str:
        return (f"DisaggRuntime(mode={self.mode!r}, rank={self.rank}, workers={self.num_workers}, "
                f"servers={self.server_ranks})")

    # ------------------------------------------------------------------ failures
    def wait(self, work, what: str, timer: str = "wait_s") -> None:
        start = time.perf_counter()
        try:
            work.wait()
        except Exception as err:  # gloo raises RuntimeError / DistBackendError on timeout or a dead peer
            raise self.failure(what, err) from err
        finally:
            self.timers[timer] += time.perf_counter() - start

    def failure(self, what: str, err: BaseException) -> DisaggServerError:
        return DisaggServerError(
            f"disagg {what} failed on rank {self.rank}: attention server rank(s) {self.server_ranks} "
            f"(workers {list(range(self.num_workers))}) died, erred or stalled past disagg.timeout_s="
            f"{self.timeout_s:g}; check those ranks' logs. Cause: {err}")

    def aborted(self, what: str, statuses: dict) -> DisaggServerError:
        """The error for calls that servers aborted; ``statuses``: server rank -> (status, culprit)."""
        reasons = [f"rank {r} rejected malformed task headers from rank {culprit}" if status == MALFORMED
                   else f"rank {r} failed computing it" for r, (status, culprit) in sorted(statuses.items())]
        return DisaggServerError(f"disagg {what} aborted on rank {self.rank}: attention server " + "; ".join(reasons)
                                 + " (that server's log has its error)")

    def record_abort(self, status: int, culprit: int, result_send) -> None:
        """A pure server aborted a call after posting ``result_send``; ``announce_abort`` shows it."""
        self._abort = (status, culprit, result_send)

    def announce_abort(self) -> None:
        """Pure servers, after aborting a call: keep the abort visible until the workers have seen it.

        They see it in that call's results if they collect it next, or in this ABORT control row
        if they begin another call first (ping-pong); waiting on either alone could deadlock.
        """
        if self._abort is None:
            return
        (status, culprit, result_send), self._abort = self._abort, None
        _, control = self._all_gather_control(abort_row(status, culprit, self.max_docs))
        deadline = time.monotonic() + self.timeout_s
        while not (result_send.is_completed() or control.is_completed()) and time.monotonic() < deadline:
            time.sleep(0.01)

    # ------------------------------------------------------------------ control
    def _all_gather_control(self, row: torch.Tensor):
        rows = [torch.empty_like(row) for _ in range(self.size)]
        return rows, dist.all_gather(rows, row, group=self.control, async_op=True)

    def gather_control(self, row: torch.Tensor) -> list[torch.Tensor]:
        """All-gather one fixed-width control row per rank."""
        op = int(row[0])
        self.counters.add("control", bytes_sent=row.numel() * 8, messages=1)
        rows, work = self._all_gather_control(row)
        phase = {FORWARD: "forward", BACKWARD: "backward"}.get(op, "idle")
        self.wait(work, f"control exchange ({OPCODES.get(op, op)})", f"control_{phase}_s")
        return rows

    def read_control(self, rows: list[torch.Tensor]) -> CallSpec:
        """The call every worker asked for; DisaggServerError if a server announces an abort."""
        aborts = {r: abort for r in self.server_ranks if (abort := read_abort(rows[r])) is not None}
        if aborts:
            raise self.aborted("control exchange", aborts)
        return parse_control(rows, self.num_workers)

    # ------------------------------------------------------------------ plans
    def plan(self, spec: CallSpec):
        """The schedule of this call; cached, since every layer of a step sees the same documents."""
        key = (spec.lengths, spec.causal, spec.window, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.dtype)
        if key not in self._plans:
            shape = AttentionShape(spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.dtype.itemsize)
            extra = {"num_servers": self.num_servers} if self.mode == "dedicated" else {}
            self._plans[key] = plan_from_lengths(spec.lengths, shape, chunk_tokens=self.chunk_tokens,
                                                 causal=spec.causal, window=spec.window, mode=self.mode, **extra)
            if len(self._plans) > 16:
                self._plans.popitem(last=False)
        self.last_plan = self._plans[key]
        return self._plans[key]

    def plan_stats(self) -> dict[str, float]:
        """Predicted max/mean load of the last plan, and what each worker alone would carry."""
        plan = getattr(self, "last_plan", None)
        if plan is None:
            return {}
        own = [0] * plan.num_workers
        for scheduled in plan.tasks:
            own[scheduled.task.worker] += scheduled.cost
        mean = sum(own) / len(own)
        return {"disagg/plan_imbalance": plan.imbalance,
                "disagg/colocated_imbalance": max(own) / mean if mean else 1.0}

    # ------------------------------------------------------------------ calls
    def local_kernel(self, q: torch.Tensor) -> LocalKernel:
        """The kernel this server computes tasks on tensors like ``q`` with."""
        return resolve_kernel(self.kernel, q)

    def defer_result_send(self, slot: int, work) -> None:
        """A pure server's result send, left in flight until its slot's next call (``settle_slot``)."""
        self._server_works[slot].append(work)

    def settle_slot(self, slot: int) -> None:
        """Wait this rank's earlier result sends on ``slot`` (posted without waiting, see module doc)."""
        for work in self._server_works[slot]:
            self.wait(work, "result send")
        self._server_works[slot] = []

    def begin(self, spec: CallSpec | None, lengths: list[int] | None, tensors: dict | None) -> Call:
        """Control exchange + posting the headers/request all-to-alls; pure servers pass None for all three."""
        spec = self.read_control(self.gather_control(control_row(self.rank, self.max_docs, spec, lengths)))
        call = Call(self, spec)
        if spec.op != STOP:
            self.settle_slot(spec.slot)
            call.post_requests(tensors)
        return call

    def stop(self) -> None:
        """Workers: tell the servers to leave ``serve`` (every worker must call it, after its last call)."""
        if self.stopped or not self.is_worker:
            return
        self.begin(STOP_CALL, [], None)
        for slot in range(NUM_SLOTS):
            self.settle_slot(slot)
        self.stopped = True

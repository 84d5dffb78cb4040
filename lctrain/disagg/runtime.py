"""The collective half of attention servers: one exchange per attention call, on workers and servers alike.

Every call runs the same collectives on every rank of the disagg group, in the same order:

1. control: a fixed-width int64 all-gather (opcode, slot, call settings, the worker's
   document lengths) on the control group; servers send IDLE;
2. every rank computes the same plan (``plan_from_lengths``) from the gathered lengths;
3. headers (int64) and payloads (q/k/v[, dout, lse, delta]) by ``all_to_all_single`` with
   variable splits on the slot's group; servers validate the headers against their plan;
4. servers rebatch every received task into one kernel call and send back a status and
   (out, lse) or (dq, dk, dv) with a second all-to-all.

A server that rejects a request (malformed headers) or fails computing it aborts: it
sends the call's results with an error status (workers collecting that call fail), and
a dedicated server then sends ABORT as its control row (workers that begin another call
first, as ping-pong does, fail there), so workers fail at once naming the server and
the culprit rank instead of waiting out ``timeout_s``.

Two slots (process groups) let two half-batches be in flight at once (ping-pong): the
control group orders calls, and each slot group orders its own payload/result pair, so
a server can answer slot A and take slot B's call before the workers collect slot A.
Servers keep no state across calls (backward recomputes from what the worker sends).
"""

from __future__ import annotations

import struct
import time
from collections import OrderedDict, defaultdict
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from lctrain.attention.counters import AttentionCounters
from lctrain_kernels.reference import accumulation_dtype

from .protocol import metadata_width, pack_metadata, unpack_metadata
from .scheduler import MODES, AttentionShape, plan_from_lengths

if TYPE_CHECKING:  # exchange.py imports this module
    from .exchange import Call

IDLE, FORWARD, BACKWARD, STOP, ABORT = 0, 1, 2, 3, 4
OPCODES = {IDLE: "IDLE", FORWARD: "FORWARD", BACKWARD: "BACKWARD", STOP: "STOP", ABORT: "ABORT"}
OK, MALFORMED, FAILED = 0, 1, 2  # a server's status of one call; MALFORMED comes with the culprit sender
NUM_SLOTS = 2
WIRE_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# opcode, slot, causal, window (-1: none), scale as float64 bits (0: default), h, h_kv, d, dtype index
NUM_CONTROL = 9


class DisaggServerError(RuntimeError):
    """An exchange with the attention servers failed: a server died, stalled past the timeout, or erred."""


def _float_bits(x: float | None) -> int:
    return 0 if x is None else struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _bits_float(bits: int) -> float | None:
    return None if bits == 0 else struct.unpack("<d", struct.pack("<q", bits))[0]


class DisaggRuntime:
    """This rank's role and process groups, the plan cache, counters and timers."""

    def __init__(self, mode: str = "colocated", num_servers: int | None = None, group=None,
                 chunk_tokens: int | None = None, timeout_s: float = 300.0, max_docs: int = 256):
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

    # ------------------------------------------------------------------ plumbing
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

    def announce_abort(self) -> None:
        """Pure servers, after aborting a call: keep the abort visible until the workers have seen it.

        They see it in that call's results if they collect it next, or in this ABORT control row
        if they begin another call first (ping-pong); waiting on either alone could deadlock.
        """
        if self._abort is None:
            return
        (status, culprit, result_send), self._abort = self._abort, None
        row = torch.zeros(self.control_width(), dtype=torch.int64)
        row[:3] = torch.tensor([ABORT, status, culprit])
        rows = [torch.empty_like(row) for _ in range(self.size)]
        control = dist.all_gather(rows, row, group=self.control, async_op=True)
        deadline = time.monotonic() + self.timeout_s
        while not (result_send.is_completed() or control.is_completed()) and time.monotonic() < deadline:
            time.sleep(0.01)

    def control_width(self) -> int:
        return NUM_CONTROL + metadata_width(self.max_docs)

    def gather_control(self, fields: list[int], lengths: list[int] | None) -> list[torch.Tensor]:
        """All-gather one fixed-width int64 control row per rank; lengths None on servers."""
        meta = pack_metadata(lengths, self.rank, self.max_docs) if lengths is not None \
            else torch.zeros(metadata_width(self.max_docs), dtype=torch.int64)
        row = torch.cat([torch.tensor(fields, dtype=torch.int64), meta])
        rows = [torch.empty_like(row) for _ in range(self.size)]
        self.counters.add("control", bytes_sent=row.numel() * 8, messages=1)
        work = dist.all_gather(rows, row, group=self.control, async_op=True)
        phase = {FORWARD: "forward", BACKWARD: "backward"}.get(fields[0], "idle")
        self.wait(work, f"control exchange ({OPCODES.get(fields[0], fields[0])})", f"control_{phase}_s")
        return rows

    def parse_control(self, rows: list[torch.Tensor]) -> "CallSpec":
        """The call every worker asked for; ValueError naming the rank that disagrees."""
        aborts = {r: tuple(rows[r][1:3].tolist()) for r in self.server_ranks if int(rows[r][0]) == ABORT}
        if aborts:
            raise self.aborted("control exchange", aborts)
        head = rows[0][:NUM_CONTROL].tolist()
        for r in range(1, self.num_workers):
            other = rows[r][:NUM_CONTROL].tolist()
            if other != head:
                raise ValueError(f"disagg workers out of step: rank {r} sent control {other} but rank 0 sent "
                                 f"{head} (different opcodes, slots, shapes or settings)")
        op = head[0]
        if op == STOP:
            return CallSpec(op, 0, True, None, None, 0, 0, 0, torch.float32, [])
        if op not in (FORWARD, BACKWARD) or not 0 <= head[1] < NUM_SLOTS or not 0 <= head[8] < len(WIRE_DTYPES):
            raise ValueError(f"malformed disagg control from rank 0: {head}")
        lengths = [unpack_metadata(rows[r][NUM_CONTROL:], r)[0] for r in range(self.num_workers)]
        return CallSpec(op, head[1], bool(head[2]), None if head[3] < 0 else head[3], _bits_float(head[4]),
                        head[5], head[6], head[7], WIRE_DTYPES[head[8]], lengths)

    def plan(self, spec: "CallSpec"):
        """The schedule of this call; cached, since every layer of a step sees the same documents."""
        key = (tuple(map(tuple, spec.lengths)), spec.causal, spec.window, spec.num_heads, spec.num_kv_heads,
               spec.head_dim, spec.dtype)
        if key not in self._plans:
            shape = AttentionShape(spec.num_heads, spec.num_kv_heads, spec.head_dim,
                                   torch.empty(0, dtype=spec.dtype).element_size())
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

    def settle_slot(self, slot: int) -> None:
        """Wait this rank's earlier result sends on ``slot`` (posted without waiting, see module doc)."""
        for work in self._server_works[slot]:
            self.wait(work, "result send")
        self._server_works[slot] = []

    # ------------------------------------------------------------------ one call
    def begin(self, spec: "CallSpec", lengths: list[int] | None, tensors: dict | None) -> "Call":
        """Control exchange + posting the headers/payload all-to-alls; ``tensors`` None on pure servers."""
        fields = [spec.op, spec.slot, int(spec.causal), -1 if spec.window is None else spec.window,
                  _float_bits(spec.scale), spec.num_heads, spec.num_kv_heads, spec.head_dim,
                  WIRE_DTYPES.index(spec.dtype)] if lengths is not None else [IDLE] + [0] * (NUM_CONTROL - 1)
        from .exchange import Call  # exchange builds on this module's helpers

        spec = self.parse_control(self.gather_control(fields, lengths))
        call = Call(self, spec)
        if spec.op != STOP:
            self.settle_slot(spec.slot)
            call.post_requests(tensors)
        return call

    def stop(self) -> None:
        """Workers: tell the servers to leave ``serve`` (every worker must call it, after its last call)."""
        if self.stopped or not self.is_worker:
            return
        self.begin(CallSpec(STOP, 0, True, None, None, 0, 0, 0, torch.float32, []), [], None)
        for slot in range(NUM_SLOTS):
            self.settle_slot(slot)
        self.stopped = True


class CallSpec:
    """What the workers asked for; identical on every rank after the control exchange."""

    def __init__(self, op, slot, causal, window, scale, num_heads, num_kv_heads, head_dim, dtype, lengths):
        self.op, self.slot, self.causal, self.window, self.scale = op, slot, causal, window, scale
        self.num_heads, self.num_kv_heads, self.head_dim, self.dtype = num_heads, num_kv_heads, head_dim, dtype
        self.lengths = lengths

    @property
    def acc_ratio(self) -> int:
        """Wire elements per accumulation-dtype element (lse, delta and gradients travel bit-cast)."""
        return torch.empty(0, dtype=accumulation_dtype(self.dtype)).element_size() // \
            torch.empty(0, dtype=self.dtype).element_size()


def to_wire(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Flat view of ``x`` in the wire dtype (bit-cast, so fp32 lse survives a bf16 payload)."""
    return x.contiguous().view(-1).view(dtype) if x.dtype != dtype else x.reshape(-1)


def from_wire(flat: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor:
    return (flat.clone().view(dtype) if flat.dtype != dtype else flat).view(shape)


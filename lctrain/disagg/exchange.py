"""One attention call on the wire: post requests, serve them, collect results.

A ``Call`` is created on every rank by ``DisaggRuntime.begin`` after the control
exchange, so all ranks hold the same plan and know every split size without
asking. Sizes per task, in wire-dtype elements (r = accumulation bytes / wire bytes):

- request  FORWARD:  q, k, v                      (q_len*h + 2*kv_len*h_kv) * d
           BACKWARD: q, k, v, dout, lse, delta    + q_len*h*d + 2*q_len*h*r
- result   FORWARD:  out, lse                     q_len*h*d + q_len*h*r
           BACKWARD: dq, dk, dv (accumulation)    (q_len*h*d + 2*kv_len*h_kv*d) * r

Every server's result message to every worker starts with a status, two int64
(status, culprit rank) bit-cast to the wire dtype, even when the pair has no tasks:
a server that rejects a request or fails computing still sends the results
all-to-all (zero-filled, status set) that the workers are waiting on, then raises.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
import torch.distributed as dist

from lctrain_kernels.reference import accumulation_dtype
from lctrain_kernels.torch_blockwise import blockwise_backward, blockwise_forward

from .protocol import NUM_FIELDS, build_task_headers, validate_headers
from .rebatch import rebatch
from .runtime import BACKWARD, FAILED, FORWARD, MALFORMED, OK, from_wire, to_wire

STATUS_BYTES = 16  # (status, culprit rank) as int64


class MalformedRequest(ValueError):
    """A request's task headers are malformed or disagree with the server's plan; ``sender`` sent them."""

    def __init__(self, message: str, sender: int):
        super().__init__(message)
        self.sender = sender


class Call:
    def __init__(self, runtime, spec):
        self.rt, self.spec = runtime, spec
        self.op = spec.op
        if spec.op not in (FORWARD, BACKWARD):
            return
        self.plan = runtime.plan(spec)
        self.group = runtime.slots[spec.slot]
        self.phase = "forward" if spec.op == FORWARD else "backward"
        self.pairs = defaultdict(list)  # (worker, server) -> scheduled tasks in task_id order
        for item in self.plan.tasks:
            self.pairs[(item.task.worker, item.server)].append(item)
        self.request_works, self.result_work = [], None

    # ---------------------------------------------------------------- sizes
    def request_numel(self, item) -> int:
        s, t = self.spec, item.task
        numel = (t.q_len * s.num_heads + 2 * t.kv_len * s.num_kv_heads) * s.head_dim
        if self.op == BACKWARD:
            numel += t.q_len * s.num_heads * (s.head_dim + 2 * s.acc_ratio)
        return numel

    def result_numel(self, item) -> int:
        s, t = self.spec, item.task
        if self.op == FORWARD:
            return t.q_len * s.num_heads * (s.head_dim + s.acc_ratio)
        return (t.q_len * s.num_heads + 2 * t.kv_len * s.num_kv_heads) * s.head_dim * s.acc_ratio

    def status_numel(self) -> int:
        return STATUS_BYTES // torch.empty(0, dtype=self.spec.dtype).element_size()

    def _result_splits(self) -> tuple[list[int], list[int]]:
        """(send, recv) splits of the results: per (server, worker) pair a status, then its tasks' results."""
        rt, n = self.rt, self.status_numel()
        send, recv = self._splits(False, self.result_numel)
        for r in range(rt.size):
            send[r] += n if rt.is_server and r < rt.num_workers else 0
            recv[r] += n if rt.is_worker and r in rt.server_ranks else 0
        return send, recv

    def _splits(self, src_role_worker: bool, numel) -> tuple[list[int], list[int]]:
        """(input splits, output splits) of this rank for a worker->server (or server->worker) message."""
        me, ranks = self.rt.rank, range(self.rt.size)
        if src_role_worker:
            send = [sum(map(numel, self.pairs.get((me, r), []))) for r in ranks]
            recv = [sum(map(numel, self.pairs.get((r, me), []))) for r in ranks]
        else:
            send = [sum(map(numel, self.pairs.get((r, me), []))) for r in ranks]
            recv = [sum(map(numel, self.pairs.get((me, r), []))) for r in ranks]
        return send, recv

    def _all_to_all(self, send: torch.Tensor, send_splits, recv_splits, dtype):
        recv = torch.empty(sum(recv_splits), dtype=dtype)
        remote = sum(n for r, n in enumerate(send_splits) if r != self.rt.rank)
        self.rt.counters.add(self.phase, bytes_sent=remote * send.element_size(), messages=1)
        work = dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.group, async_op=True)
        return recv, work

    # ---------------------------------------------------------------- requests
    def post_requests(self, tensors: dict | None) -> None:
        """Post the headers and payload all-to-alls (workers send; servers only receive)."""
        s, me = self.spec, self.rt.rank
        headers, payload = [], []
        for server in range(self.rt.size):
            items = self.pairs.get((me, server), []) if tensors is not None else []
            if items:
                headers.append(build_task_headers(items, s.num_heads, s.num_kv_heads, s.head_dim))
                payload += [self._request_payload(item, tensors) for item in items]
        send_h = torch.cat(headers).reshape(-1) if headers else torch.empty(0, dtype=torch.int64)
        send_p = torch.cat(payload) if payload else torch.empty(0, dtype=s.dtype)
        header_rows = lambda item: NUM_FIELDS  # noqa: E731
        h_send, h_recv = self._splits(True, header_rows)
        p_send, p_recv = self._splits(True, self.request_numel)
        self.recv_headers, work_h = self._all_to_all(send_h, h_send, h_recv, torch.int64)
        self.recv_payload, work_p = self._all_to_all(send_p, p_send, p_recv, s.dtype)
        self.request_works = [work_h, work_p]
        self.h_recv, self.p_recv = h_recv, p_recv

    def _request_payload(self, item, x) -> torch.Tensor:
        t, dtype = item.task, self.spec.dtype
        q_range, kv_range = slice(t.q_start, t.q_end), slice(t.kv_start, t.kv_end)
        parts = [x["q"][q_range], x["k"][kv_range], x["v"][kv_range]]
        if self.op == BACKWARD:
            parts += [x["dout"][q_range], x["lse"][:, q_range], x["delta"][:, q_range]]
        return torch.cat([to_wire(p, dtype) for p in parts])

    # ---------------------------------------------------------------- server
    def serve(self) -> None:
        """Servers: validate, compute every received task in one kernel call, post the results.

        Every rank posts the results all-to-all (workers as receivers); servers do not wait
        on it here, so a ping-pong partner's call can start before the workers collect.
        """
        me = self.rt.rank
        buffers: dict[int, list[torch.Tensor]] = {}
        if self.rt.is_server and any(self.h_recv):
            for work in self.request_works:
                self.rt.wait(work, f"{self.phase} request receive", f"wait_{self.phase}_s")
            start = time.perf_counter()
            try:
                buffers = self._compute(self._received())
            except Exception as err:  # tell the waiting workers before failing here
                culprit = err.sender if isinstance(err, MalformedRequest) else -1
                status = MALFORMED if culprit >= 0 else FAILED
                self._post_results({}, status, culprit)
                if self.rt.is_worker:  # colocated: every rank posts these results before waiting on us
                    self.rt.wait(self.result_work, f"{self.phase} abort send")
                else:  # the workers may begin another call first: serve() ends with announce_abort
                    self.rt._abort = (status, culprit, self.result_work)
                raise
            self.rt.timers[f"server_{self.phase}_s"] += time.perf_counter() - start
            self.rt.counters.add(self.phase, pairs=sum(t.cost for t in self.plan.tasks if t.server == me))
        self._post_results(buffers, OK, -1)
        if not self.rt.is_worker:
            self.rt._server_works[self.spec.slot].append(self.result_work)

    def _post_results(self, buffers: dict, status: int, culprit: int) -> None:
        """Post the results all-to-all: per worker the status, then its results (zeros unless OK)."""
        dtype = self.spec.dtype
        send_splits, recv_splits = self._result_splits()
        head = to_wire(torch.tensor([status, culprit], dtype=torch.int64), dtype)
        parts = []
        for worker, numel in enumerate(send_splits):
            if numel:
                body = buffers.get(worker, []) if status == OK else [torch.zeros(numel - len(head), dtype=dtype)]
                parts += [head, *body]
        send = torch.cat(parts) if parts else torch.empty(0, dtype=dtype)
        assert send.numel() == sum(send_splits)
        self.recv_results, self.result_work = self._all_to_all(send, send_splits, recv_splits, dtype)

    def _received(self):
        """Per sender (rank, headers, qkv payload, extras), headers checked against this server's plan."""
        s, me = self.spec, self.rt.rank
        headers = self.recv_headers.split(self.h_recv)
        payloads = self.recv_payload.split(self.p_recv)
        received = []
        for sender in range(self.rt.size):
            items = self.pairs.get((sender, me), [])
            if not items:
                continue
            rows = headers[sender].view(-1, NUM_FIELDS)
            qkv_numel = sum((i.task.q_len * s.num_heads + 2 * i.task.kv_len * s.num_kv_heads) * s.head_dim
                            for i in items)
            check_received_headers(rows, items, qkv_numel, sender, me, s)  # MalformedRequest naming sender
            flat = payloads[sender]
            received.append((sender, rows, flat, items))
        return received

    def _compute(self, received) -> dict[int, list[torch.Tensor]]:
        s = self.spec
        acc = accumulation_dtype(s.dtype)
        per_task, triples = {}, []
        for sender, rows, flat, items in received:
            offset = 0
            qkv_parts = []
            for item in items:  # per task: q, k, v [, dout, lse, delta]
                t, n = item.task, self.request_numel(item)
                chunk = flat[offset:offset + n]
                offset += n
                qkv = (t.q_len * s.num_heads + 2 * t.kv_len * s.num_kv_heads) * s.head_dim
                qkv_parts.append(chunk[:qkv])
                if self.op == BACKWARD:
                    q_numel, stat = t.q_len * s.num_heads * s.head_dim, t.q_len * s.num_heads * s.acc_ratio
                    extra = chunk[qkv:].split([q_numel, stat, stat])
                    per_task[item.task_id] = (extra[0].view(t.q_len, s.num_heads, s.head_dim),
                                              from_wire(extra[1], acc, (s.num_heads, t.q_len)),
                                              from_wire(extra[2], acc, (s.num_heads, t.q_len)))
            triples.append((sender, rows, torch.cat(qkv_parts)))
        call = rebatch(triples)
        coords = (call.q_pos, call.k_pos, call.q_doc, call.k_doc, s.causal, s.window, s.scale)
        items = {item.task_id: item for _, _, _, its in received for item in its}
        buffers: dict[int, list[torch.Tensor]] = defaultdict(list)
        if self.op == FORWARD:
            out, lse = blockwise_forward(call.q, call.k, call.v, *coords)
            for sender, results in call.split(out, lse).items():
                buffers[sender] += [to_wire(x, s.dtype) for pair in results for x in pair]
            return buffers
        dout = torch.cat([per_task[i][0] for i in call.task_ids])[None]
        lse = torch.cat([per_task[i][1] for i in call.task_ids], dim=1)[None]
        delta = torch.cat([per_task[i][2] for i in call.task_ids], dim=1)[None]
        dq, dk, dv = blockwise_backward(dout, call.q, call.k, call.v, None, lse, *coords, delta=delta)
        kv_lens = [items[i].task.kv_len for i in call.task_ids]
        for sender, dq_t, dk_t, dv_t in zip(call.senders, dq[0].split(call.q_lens), dk[0].split(kv_lens),
                                            dv[0].split(kv_lens)):
            buffers[sender] += [to_wire(x, s.dtype) for x in (dq_t, dk_t, dv_t)]
        return buffers

    # ---------------------------------------------------------------- worker
    def results(self):
        """Workers: wait for the results; yield (scheduled task, result tensors) of this rank's tasks."""
        for work in self.request_works:
            self.rt.wait(work, f"{self.phase} request send", f"wait_{self.phase}_s")
        self.rt.wait(self.result_work, f"{self.phase} result receive", f"wait_{self.phase}_s")
        s, me, acc = self.spec, self.rt.rank, accumulation_dtype(self.spec.dtype)
        chunks, n = self.recv_results.split(self._result_splits()[1]), self.status_numel()
        statuses = {r: from_wire(chunks[r][:n], torch.int64, (2,)).tolist() for r in self.rt.server_ranks}
        aborted = {r: tuple(st) for r, st in statuses.items() if st[0] != OK}
        if aborted:
            raise self.rt.aborted(f"{self.phase} call", aborted)
        for server in range(self.rt.size):
            offset, flat = n if server in statuses else 0, chunks[server]
            for item in self.pairs.get((me, server), []):
                t, h, d = item.task, s.num_heads, s.head_dim
                if self.op == FORWARD:
                    sizes = [t.q_len * h * d, t.q_len * h * s.acc_ratio]
                    out, lse = flat[offset:offset + sum(sizes)].split(sizes)
                    yield item, (out.view(t.q_len, h, d), from_wire(lse, acc, (h, t.q_len)))
                else:
                    kv = t.kv_len * s.num_kv_heads * d * s.acc_ratio
                    sizes = [t.q_len * h * d * s.acc_ratio, kv, kv]
                    parts = flat[offset:offset + sum(sizes)].split(sizes)
                    yield item, (from_wire(parts[0], acc, (t.q_len, h, d)),
                                 from_wire(parts[1], acc, (t.kv_len, s.num_kv_heads, d)),
                                 from_wire(parts[2], acc, (t.kv_len, s.num_kv_heads, d)))
                offset += sum(sizes)


def check_received_headers(rows: torch.Tensor, items, qkv_numel: int, sender: int, receiver: int, spec) -> None:
    """MalformedRequest (a ValueError) naming ``sender`` unless its headers are well formed and match the plan."""
    try:
        validate_headers(rows, qkv_numel, sender, receiver_rank=receiver, num_heads=spec.num_heads,
                         num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim)
    except ValueError as err:
        raise MalformedRequest(str(err), sender) from None
    expected = build_task_headers(items, spec.num_heads, spec.num_kv_heads, spec.head_dim)
    if not torch.equal(rows, expected):
        bad = int((rows != expected).any(dim=1).nonzero()[0])
        raise MalformedRequest(f"malformed task headers from rank {sender}: row {bad} is {rows[bad].tolist()} but "
                               f"this server's plan says {expected[bad].tolist()} (ranks computed different plans)",
                               sender)

"""One attention call on the wire: post requests, serve them, collect results.

A ``Call`` is created on every rank by ``DisaggRuntime.begin`` after the control
exchange, so all ranks hold the same plan and know every split size without asking
(the messages and their sizes: ``protocol``). A server that rejects a request or
fails computing it still sends the results all-to-all the workers are waiting on
(zero-filled, its status set), then raises.
"""

from __future__ import annotations

import time
from collections import defaultdict
from itertools import repeat

import torch
import torch.distributed as dist

from .protocol import (
    BACKWARD,
    FAILED,
    FORWARD,
    MALFORMED,
    NUM_FIELDS,
    OK,
    MalformedRequest,
    abort_results,
    build_task_headers,
    check_request_headers,
    pack_request,
    pack_results,
    read_status,
    request_numel,
    result_numel,
    status_numel,
    unpack_request,
    unpack_results,
)
from .rebatch import compute_results


class Call:
    """One call's all-to-alls on this rank of ``runtime`` (a ``DisaggRuntime``)."""

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

    def _tasks(self, worker: int, server: int) -> list:
        return [item.task for item in self.pairs.get((worker, server), [])]

    # ---------------------------------------------------------------- sizes
    def _splits(self, numel, requests: bool) -> tuple[list[int], list[int]]:
        """(send, recv) splits of this rank: ``requests`` go worker -> server, results back."""
        me, ranks = self.rt.rank, range(self.rt.size)
        as_worker = [sum(map(numel, self.pairs.get((me, r), []))) for r in ranks]
        as_server = [sum(map(numel, self.pairs.get((r, me), []))) for r in ranks]
        return (as_worker, as_server) if requests else (as_server, as_worker)

    def _result_splits(self) -> tuple[list[int], list[int]]:
        """Per (server, worker) pair a status, then its tasks' results."""
        rt, n = self.rt, status_numel(self.spec.dtype)
        send, recv = self._splits(lambda item: result_numel(self.spec, item.task), requests=False)
        for r in range(rt.size):
            send[r] += n if rt.is_server and r < rt.num_workers else 0
            recv[r] += n if rt.is_worker and r in rt.server_ranks else 0
        return send, recv

    def _all_to_all(self, send: torch.Tensor, send_splits, recv_splits, dtype):
        recv = torch.empty(sum(recv_splits), dtype=dtype)
        remote = sum(n for r, n in enumerate(send_splits) if r != self.rt.rank)
        self.rt.counters.add(self.phase, bytes_sent=remote * send.element_size(), messages=1)
        work = dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.group, async_op=True)
        return recv, work

    # ---------------------------------------------------------------- requests
    def post_requests(self, tensors: dict | None) -> None:
        """Post the headers and request all-to-alls (workers send; pure servers only receive)."""
        s, me = self.spec, self.rt.rank
        headers, requests = [], []
        for server in range(self.rt.size):
            items = self.pairs.get((me, server), [])
            if items:
                headers.append(build_task_headers(items, s.num_heads, s.num_kv_heads, s.head_dim))
                requests.append(pack_request(s, self._tasks(me, server), tensors))
        send_h = torch.cat(headers).reshape(-1) if headers else torch.empty(0, dtype=torch.int64)
        send_r = torch.cat(requests) if requests else torch.empty(0, dtype=s.dtype)
        h_send, self.h_recv = self._splits(lambda item: NUM_FIELDS, requests=True)
        r_send, self.r_recv = self._splits(lambda item: request_numel(s, item.task), requests=True)
        self.recv_headers, work_h = self._all_to_all(send_h, h_send, self.h_recv, torch.int64)
        self.recv_requests, work_r = self._all_to_all(send_r, r_send, self.r_recv, s.dtype)
        self.request_works = [work_h, work_r]

    # ---------------------------------------------------------------- server
    def serve(self) -> None:
        """Servers: validate, compute every received task in one kernel call, post the results.

        Every rank posts the results all-to-all (workers as receivers); servers do not wait
        on it here, so a ping-pong partner's call can start before the workers collect.
        """
        results = {}
        if self.rt.is_server and any(self.h_recv):
            for work in self.request_works:
                self.rt.wait(work, f"{self.phase} request receive", f"wait_{self.phase}_s")
            start = time.perf_counter()
            try:
                results = compute_results(self._received(), self.spec, self.rt.local_kernel)
            except Exception as err:  # tell the waiting workers before failing here
                self._abort(err)
                raise
            self.rt.timers[f"server_{self.phase}_s"] += time.perf_counter() - start
            self.rt.counters.add(self.phase, pairs=sum(t.cost for t in self.plan.tasks if t.server == self.rt.rank))
        self._post_results(results)
        if not self.rt.is_worker:
            self.rt.defer_result_send(self.spec.slot, self.result_work)

    def _abort(self, err: Exception) -> None:
        """Send every worker this call's status in place of its results."""
        culprit = err.sender if isinstance(err, MalformedRequest) else -1
        status = MALFORMED if culprit >= 0 else FAILED
        self._post_results({}, status, culprit)
        if self.rt.is_worker:  # colocated: every rank posts these results before waiting on us
            self.rt.wait(self.result_work, f"{self.phase} abort send")
        else:  # the workers may begin another call first: serve() ends with announce_abort
            self.rt.record_abort(status, culprit, self.result_work)

    def _post_results(self, results: dict, status: int = OK, culprit: int = -1) -> None:
        """Post the results all-to-all: per worker the status, then its results (zeros unless OK)."""
        s, me = self.spec, self.rt.rank
        workers = range(self.rt.num_workers) if self.rt.is_server else ()
        messages = [pack_results(s, results.get(w, [])) if status == OK
                    else abort_results(s, self._tasks(w, me), status, culprit) for w in workers]
        send = torch.cat(messages) if messages else torch.empty(0, dtype=s.dtype)
        send_splits, recv_splits = self._result_splits()
        self.recv_results, self.result_work = self._all_to_all(send, send_splits, recv_splits, s.dtype)

    def _received(self) -> list:
        """(sender, scheduled task, its tensors) of every request, headers checked against this server's plan."""
        s, me = self.spec, self.rt.rank
        headers = self.recv_headers.split(self.h_recv)
        requests = self.recv_requests.split(self.r_recv)
        received = []
        for sender in range(self.rt.size):
            items = self.pairs.get((sender, me), [])
            if items:
                check_request_headers(headers[sender].view(-1, NUM_FIELDS), items, s, sender, me)
                received += zip(repeat(sender), items, unpack_request(s, self._tasks(sender, me), requests[sender]))
        return received

    # ---------------------------------------------------------------- worker
    def results(self):
        """Workers: wait for the results; yield (scheduled task, result tensors) of this rank's tasks."""
        for work in self.request_works:
            self.rt.wait(work, f"{self.phase} request send", f"wait_{self.phase}_s")
        self.rt.wait(self.result_work, f"{self.phase} result receive", f"wait_{self.phase}_s")
        s, me = self.spec, self.rt.rank
        messages = self.recv_results.split(self._result_splits()[1])
        statuses = {r: read_status(messages[r], s.dtype) for r in self.rt.server_ranks}
        aborted = {r: status for r, status in statuses.items() if status[0] != OK}
        if aborted:
            raise self.rt.aborted(f"{self.phase} call", aborted)
        for server in self.rt.server_ranks:
            items = self.pairs.get((me, server), [])
            yield from zip(items, unpack_results(s, self._tasks(me, server), messages[server], server))

"""Disaggregated attention is exact (float64) on gloo; bad headers, dead or stalled servers fail loudly.

Each worker holds its own skewed batch of packed documents (different lengths per
worker, a long document split into several tasks, padding), the result of one
disaggregated call must equal reference_attention on that worker's tensors alone:
out, lse, dq, dk, dv. One spawn per world size runs every case in both modes.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from lctrain.attention import Coords, Mask, build_attention, reference_attention
from lctrain.disagg.attention import serve
from lctrain.disagg.exchange import Call
from lctrain.disagg.protocol import BACKWARD, FORWARD, CallSpec, Field, build_task_headers, check_request_headers
from lctrain.disagg.runtime import DisaggServerError
from lctrain.disagg.scheduler import AttentionShape, plan_from_lengths
from lctrain.distributed import init_distributed
from lctrain.distributed.spawn import free_port, run_ranks

H, H_KV, D = 4, 2, 8
# (causal, window, chunk_tokens, per-worker row layouts: lists of doc lengths, -n = n padding tokens)
CASES = {
    "causal-gqa": (True, None, None, [[[300, 20, -4]], [[30, 40]], [[12, 12, 12]], [[50]]]),
    "window-rows": (True, 24, 64, [[[100, 28], [60, -8, 60]], [[90]], [[200, 7]], [[5, 5]]]),
    "bidirectional": (False, None, 32, [[[70, 10]], [[130]], [[16, 48]], [[64, -1]]]),
}


def _disagg(mode, timeout_s, chunk_tokens=None):
    """Disagg attention over the world; dedicated: the last rank serves."""
    return build_attention("disagg", mode=mode, num_servers=1 if mode == "dedicated" else None,
                           chunk_tokens=chunk_tokens, timeout_s=timeout_s, kernel="torch")


def _coords(doc):
    """Coordinates of packed (b, s) rows: positions 0..s-1 in every row."""
    return Coords(torch.arange(doc.shape[-1]).expand_as(doc), doc)


def _worker_batch(rows, seed):
    seq = max(sum(abs(n) for n in row) for row in rows)
    doc = torch.full((len(rows), seq), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i, n in enumerate(row):
            if n > 0:
                doc[r, start:start + n] = i
            start += abs(n)
    g = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(len(rows), seq, H, D, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(len(rows), seq, H_KV, D, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v, dout, doc


def _check_case(attention, worker, causal, window, rows):
    q, k, v, dout, doc = _worker_batch(rows, seed=100 + worker)
    want_q, want_k, want_v = (x.clone().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = reference_attention(want_q, want_k, want_v, causal, doc, window)
    (ref_out * dout).sum().backward()
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = attention(q, k, v, _coords(doc), Mask(causal, window), return_lse=True)
    (out * dout).sum().backward()
    errors = {"out": (out - ref_out).abs().max(), "lse": (torch.where(ref_lse.isinf(), 0, lse - ref_lse)).abs().max(),
              "lse_inf_match": float(not torch.equal(lse.isinf(), ref_lse.isinf())),
              "dq": (q.grad - want_q.grad).abs().max(), "dk": (k.grad - want_k.grad).abs().max(),
              "dv": (v.grad - want_v.grad).abs().max()}
    return {name: float(e) for name, e in errors.items()}


def _ranks(rank, world):
    init_distributed("cpu")
    torch.set_num_threads(1)
    results = {}
    for mode in ("colocated", "dedicated"):
        for name, (causal, window, chunk, layouts) in CASES.items():
            attention = _disagg(mode, timeout_s=60, chunk_tokens=chunk)
            rt = attention.runtime
            if rt.is_worker:
                results[(mode, name)] = _check_case(attention, rank, causal, window, layouts[rank])
                attention.finish()
            else:
                assert serve(attention) == 2  # one forward, one backward
            results[(mode, name, "pairs")] = rt.counters.pairs
            results[(mode, name, "bytes")] = rt.counters.bytes_sent
    return results


@pytest.mark.parametrize("world", (3, 4))
def test_disaggregated_attention_matches_reference(world):
    results = run_ranks(_ranks, world, timeout=120)
    for rank, res in enumerate(results):
        for key, errors in res.items():
            if len(key) == 2:
                assert all(e < 1e-10 for e in errors.values()), (rank, key, errors)
    for mode in ("colocated", "dedicated"):
        for name in CASES:
            pairs = [res[(mode, name, "pairs")] for res in results]
            if mode == "dedicated":  # the last rank computes everything, the workers nothing
                assert pairs[:-1] == [0] * (world - 1) and pairs[-1] > 0
            else:
                assert all(p > 0 for p in pairs), pairs
            assert all(res[(mode, name, "bytes")] > 0 for res in results)


def test_malformed_headers_are_rejected_naming_the_sender():
    shape = AttentionShape(H, H_KV, D)
    plan = plan_from_lengths([[300, 20], [40], [12, 12]], shape, causal=True, mode="dedicated", num_servers=1)
    spec = CallSpec(FORWARD, 0, True, None, None, H, H_KV, D, torch.float64)
    server = plan.tasks[0].server
    sender = next(t.task.worker for t in plan.tasks if t.server == server and t.task.worker != server)
    items = [t for t in plan.tasks if t.task.worker == sender and t.server == server]
    rows = build_task_headers(items, H, H_KV, D)
    check_request_headers(rows, items, spec, sender, server)  # well formed: accepted
    for field, value, message in ((Field.Q_LEN, -1, "negative q_len"), (Field.WORKER, 7, "expected only the sender"),
                                  (Field.SERVER, server + 1, "arrived at rank"), (Field.KV_START, 1, "plan says")):
        bad = rows.clone()
        bad[0, field] = value if field != Field.KV_START else bad[0, field] + value
        with pytest.raises(ValueError, match=f"from rank {sender}.*{message}"):
            check_request_headers(bad, items, spec, sender, server)


# ---------------------------------------------------------------- a server dies mid-step

TIMEOUT_S = 8


def _dying_server(rank, world, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    attention = _disagg("dedicated", timeout_s=TIMEOUT_S)
    if not attention.runtime.is_worker:
        rt = attention.runtime
        for _ in range(3):  # serve a forward, a backward and the next forward's control, then die
            call = rt.begin(None, None, None)
            call.serve()
        os._exit(0)
    q, k, v, dout, doc = _worker_batch([[200, 30]], seed=rank)
    start = time.perf_counter()
    try:
        for _ in range(5):
            q.requires_grad_()
            (attention(q, k, v, _coords(doc)) * dout).sum().backward()
        queue.put((rank, "no error", time.perf_counter() - start))
    except DisaggServerError as err:
        queue.put((rank, str(err), time.perf_counter() - start))
    queue.close()
    queue.join_thread()  # flush before the hard exit (a clean shutdown would wait on the dead peer)
    os._exit(0)


def test_killed_server_raises_a_clear_error_not_a_hang():
    ctx = torch.multiprocessing.get_context("spawn")
    queue, world = ctx.Queue(), 3
    os.environ["MASTER_PORT"] = str(free_port())
    procs = [ctx.Process(target=_dying_server, args=(r, world, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        reports = [queue.get(timeout=TIMEOUT_S + 60) for _ in range(world - 1)]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    for rank, message, elapsed in reports:
        assert "attention server rank(s) [2]" in message, (rank, message)
        assert elapsed < TIMEOUT_S + 5, (rank, elapsed)


# ---------------------------------------------------------------- a server stalls mid-step

STALL_TIMEOUT_S = 2


def _stalling_server(rank, world):
    init_distributed("cpu")
    torch.set_num_threads(1)
    attention = _disagg("dedicated", timeout_s=STALL_TIMEOUT_S)
    if not attention.runtime.is_worker:
        answer = Call.serve

        def stall(call):  # answers the forward, then stops responding (alive, holding its sockets)
            if call.op == BACKWARD:
                time.sleep(3600)
            answer(call)

        Call.serve = stall
        serve(attention)
        return "served"
    q, k, v, dout, doc = _worker_batch([[120, 30]], seed=rank)
    out = attention(q.requires_grad_(), k, v, _coords(doc))
    start = time.perf_counter()
    try:
        (out * dout).sum().backward()
        return "no error", 0.0
    except DisaggServerError as err:
        return str(err), time.perf_counter() - start


def test_stalled_server_fails_the_workers_within_the_timeout():
    start = time.perf_counter()
    reports = run_ranks(_stalling_server, 3, ranks=(0, 1), timeout=60, join_timeout=10)
    assert reports[2] is None  # never returned: killed once the workers had reported
    for rank, (message, elapsed) in enumerate(reports[:2]):
        assert "backward result receive failed" in message and "attention server rank(s) [2]" in message, message
        assert f"timeout_s={STALL_TIMEOUT_S}" in message, message
        assert STALL_TIMEOUT_S - 0.5 < elapsed < STALL_TIMEOUT_S + 3, (rank, elapsed)
    assert time.perf_counter() - start < 40


# ---------------------------------------------------------------- a worker sends malformed headers

MALFORMED_TIMEOUT_S = 20  # failing fast means well under this


def _corrupting_worker(rank, world):
    """Rank 1 shifts the q_start of the first task header it sends; the receiving server aborts."""
    init_distributed("cpu")
    torch.set_num_threads(1)
    if rank == 1:
        send = Call._all_to_all

        def corrupt(call, data, send_splits, recv_splits, dtype):
            if dtype == torch.int64 and data.numel():  # the only int64 all-to-all: task headers
                data = data.clone()
                data[Field.Q_START] += 1
            return send(call, data, send_splits, recv_splits, dtype)

        Call._all_to_all = corrupt
    q, k, v, _, doc = _worker_batch([[120, 30]], seed=rank)
    out = {}
    for case in ("colocated", "dedicated", "dedicated-pingpong"):
        mode = case.split("-")[0]
        attention = _disagg(mode, timeout_s=MALFORMED_TIMEOUT_S)
        start = time.perf_counter()
        try:
            if not attention.runtime.is_worker:
                serve(attention)
            elif case.endswith("pingpong"):  # slot 1's control exchange follows slot 0's requests
                for slot in (0, 1):
                    attention.start(q, k, v, _coords(doc), slot=slot)
            else:
                attention(q, k, v, _coords(doc))
            out[case] = ("no error", "", 0.0)
        except Exception as err:  # noqa: BLE001 - the test asserts on the type
            out[case] = (type(err).__name__, str(err), time.perf_counter() - start)
    return out


def test_malformed_headers_on_the_wire_abort_every_rank_naming_server_and_sender():
    reports = run_ranks(_corrupting_worker, 3, timeout=60, join_timeout=3)
    for case in ("colocated", "dedicated", "dedicated-pingpong"):
        outcomes = [r[case] for r in reports]
        detected = [rank for rank, (kind, _, _) in enumerate(outcomes) if kind == "MalformedRequest"]
        assert len(detected) == 1, (case, outcomes)  # the server that received the bad row
        server = detected[0]
        assert "malformed task headers from rank 1" in outcomes[server][1], (case, outcomes)
        assert "plan says" in outcomes[server][1]
        if case.startswith("dedicated"):
            assert server == 2
        for rank, (kind, message, elapsed) in enumerate(outcomes):
            if rank != server:
                assert kind == "DisaggServerError", (case, rank, message)
                assert f"attention server rank {server} rejected malformed task headers from rank 1" in message
                assert ("control exchange" if case.endswith("pingpong") else "forward call") in message, message
            assert elapsed < 5, (case, rank, elapsed)  # failed fast, not at MALFORMED_TIMEOUT_S

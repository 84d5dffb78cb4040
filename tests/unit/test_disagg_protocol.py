"""Wire format of the attention servers, and exactness of the server's single rebatched kernel call."""

from functools import partial

import pytest
import torch

from lctrain.attention import reference_attention
from lctrain.attention.local_kernels import resolve_kernel
from lctrain.disagg.protocol import (
    BACKWARD,
    FORWARD,
    META_HEADER,
    CallSpec,
    Field,
    build_task_headers,
    check_request_headers,
    pack_metadata,
    pack_request,
    pack_results,
    read_status,
    request_numel,
    unpack_metadata,
    unpack_request,
    unpack_results,
    validate_headers,
)
from lctrain.disagg.rebatch import compute_results, rebatch
from lctrain.disagg.scheduler import AttentionShape, plan_from_lengths

SENDER = 3
TORCH_KERNEL = partial(resolve_kernel, "torch")


def tasks_between(plan, worker, server):
    """What ``worker`` sends ``server``, in task_id order (the order of headers and request)."""
    return [t for t in plan.tasks if t.task.worker == worker and t.server == server]


def spec_of(op, num_heads, num_kv_heads, head_dim, dtype, causal=True, window=None):
    return CallSpec(op, 0, causal, window, None, num_heads, num_kv_heads, head_dim, dtype)


def test_metadata_round_trip_and_rejection_names_the_sender():
    meta = pack_metadata([5, 1, 20], rank=SENDER, max_docs=6, num_pad_tokens=2)
    assert meta.dtype == torch.int64 and meta.shape == (META_HEADER + 6,)
    assert unpack_metadata(meta, SENDER, seq_len=28) == ([5, 1, 20], 2)
    corruptions = {
        "magic": lambda m: m.__setitem__(0, 7),
        "version": lambda m: m.__setitem__(1, 99),
        "claims to come from rank 1": lambda m: m.__setitem__(2, 1),
        "num_docs": lambda m: m.__setitem__(3, 50),
        "lengths must be >= 1": lambda m: m.__setitem__(META_HEADER + 1, 0),
        "and 0 after": lambda m: m.__setitem__(META_HEADER + 4, 9),
    }
    for message, corrupt in corruptions.items():
        bad = meta.clone()
        corrupt(bad)
        with pytest.raises(ValueError, match=f"rank {SENDER}.*{message}"):
            unpack_metadata(bad, SENDER)
    with pytest.raises(ValueError, match="expected 30"):
        unpack_metadata(meta, SENDER, seq_len=30)
    with pytest.raises(ValueError, match=f"rank {SENDER}.*int64"):
        unpack_metadata(meta.float(), SENDER)
    with pytest.raises(ValueError, match="raise max_docs"):
        pack_metadata([1] * 7, rank=0, max_docs=6)


def sample_tasks():
    lengths = [[40, 7, 90], [12, 30], [200]]
    plan = plan_from_lengths(lengths, AttentionShape(4, 2, 8), mode="dedicated", num_servers=2, chunk_tokens=32)
    tasks = tasks_between(plan, 0, plan.server_ranks[0])
    assert len(tasks) >= 2
    return tasks, plan.server_ranks[0]


def sample_headers():
    tasks, server = sample_tasks()
    return build_task_headers(tasks, 4, 2, 8), server


def test_headers_validate_and_malformed_ones_name_the_sender():
    headers, server = sample_headers()
    headers[:, Field.WORKER] = SENDER
    total = int(headers[:, Field.PAYLOAD_NUMEL].sum())
    validate_headers(headers, total, SENDER, receiver_rank=server, num_heads=4, num_kv_heads=2, head_dim=8)

    def bump(field, delta=1, row=1):
        def corrupt(h):
            h[row, field] += delta
        return corrupt

    corruptions = {
        "negative q_len": bump(Field.Q_LEN, -1000),
        "negative kv_start": bump(Field.KV_START, -1000, row=0),
        "payload_numel": bump(Field.KV_LEN),
        "payload_offset": bump(Field.PAYLOAD_OFFSET, 8),
        "duplicate task ids": lambda h: h.__setitem__((1, Field.TASK_ID), int(h[0, Field.TASK_ID])),
        "expected only the sender": bump(Field.WORKER),
        "arrived at rank": bump(Field.SERVER),
        "disagree": bump(Field.NUM_HEADS, 4),
        "num_heads % num_kv_heads": lambda h: h[:, Field.NUM_KV_HEADS].fill_(3),
    }
    for message, corrupt in corruptions.items():
        bad = headers.clone()
        corrupt(bad)
        with pytest.raises(ValueError, match=f"from rank {SENDER}: .*{message}"):
            validate_headers(bad, total, SENDER, receiver_rank=server)
    for message, call in {
        "arrived": lambda: validate_headers(headers, total + 1, SENDER),
        "head_dim 8 != 16": lambda: validate_headers(headers, total, SENDER, head_dim=16),
        "int64": lambda: validate_headers(headers.int(), total, SENDER),
        r"\(N, 13\)": lambda: validate_headers(headers[:, :5], total, SENDER),
        "no tasks": lambda: validate_headers(headers[:0], 5, SENDER),
    }.items():
        with pytest.raises(ValueError, match=f"from rank {SENDER}: .*{message}"):
            call()
    validate_headers(headers[:0], 0, SENDER)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_request_round_trip(dtype):
    """pack_request -> unpack_request gives back every task's slices; statistics survive a bf16 wire."""
    scheduled, _ = sample_tasks()
    tasks = [s.task for s in scheduled]
    headers = build_task_headers(scheduled, 4, 2, 8)
    gen = torch.Generator().manual_seed(0)
    seq, acc = 137, torch.float64 if dtype == torch.float64 else torch.float32
    x = {"q": torch.randn(seq, 4, 8, generator=gen).to(dtype), "dout": torch.randn(seq, 4, 8, generator=gen).to(dtype),
         "k": torch.randn(seq, 2, 8, generator=gen).to(dtype), "v": torch.randn(seq, 2, 8, generator=gen).to(dtype),
         "lse": torch.randn(4, seq, generator=gen, dtype=acc), "delta": torch.randn(4, seq, generator=gen, dtype=acc)}
    for op in (FORWARD, BACKWARD):
        spec = spec_of(op, 4, 2, 8, dtype)
        request = pack_request(spec, tasks, x)
        assert request.dtype == dtype and request.numel() == sum(request_numel(spec, t) for t in tasks)
        if op == FORWARD:  # the headers address the q, k, v part exactly
            assert request.numel() == int(headers[:, Field.PAYLOAD_NUMEL].sum())
        for task, got in zip(tasks, unpack_request(spec, tasks, request)):
            q_rows, kv_rows = slice(task.q_start, task.q_end), slice(task.kv_start, task.kv_end)
            want = [x["q"][q_rows], x["k"][kv_rows], x["v"][kv_rows]]
            if op == BACKWARD:
                want += [x["dout"][q_rows], x["lse"][:, q_rows], x["delta"][:, q_rows]]
            assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))


CASES = {  # name: (num_heads, num_kv_heads, causal, window)
    "causal": (2, 2, True, None),
    "noncausal": (2, 2, False, None),
    "gqa_causal": (4, 1, True, None),
    "window_causal": (4, 2, True, 7),
    "window_noncausal": (2, 1, False, 5),
}


@pytest.mark.parametrize("mode", ["colocated", "dedicated"])
@pytest.mark.parametrize("case", list(CASES))
def test_rebatched_call_reproduces_reference_per_document(case, mode):
    """Workers' documents -> tasks (long ones in several chunks) -> servers -> one kernel call each
    -> results back: every worker's out and lse equal reference_attention on its packed sequence."""
    num_heads, num_kv_heads, causal, window = CASES[case]
    head_dim, num_pad = 8, 3
    lengths = [[5, 70, 1, 17], [33, 9, 40], [96]]
    plan = plan_from_lengths(lengths, AttentionShape(num_heads, num_kv_heads, head_dim), chunk_tokens=16,
                             causal=causal, window=window, mode=mode,
                             num_servers=None if mode == "colocated" else 2)
    spec = spec_of(FORWARD, num_heads, num_kv_heads, head_dim, torch.float64, causal, window)
    gen = torch.Generator().manual_seed(1)
    inputs, docs = [], []
    for worker_lengths in lengths:
        seq = sum(worker_lengths) + num_pad
        inputs.append({name: torch.randn(seq, h, head_dim, generator=gen, dtype=torch.float64)
                       for name, h in (("q", num_heads), ("k", num_kv_heads), ("v", num_kv_heads))})
        docs.append(torch.cat([torch.full((n,), i) for i, n in enumerate(worker_lengths)]
                              + [torch.full((num_pad,), -1)]))

    outs = [torch.zeros_like(x["q"]) for x in inputs]
    lses = [torch.full((num_heads, x["q"].shape[0]), float("-inf"), dtype=torch.float64) for x in inputs]
    for server in plan.server_ranks:
        received = []  # workers -> server: headers and request per (worker, server) pair
        for worker in range(len(lengths)):
            scheduled = tasks_between(plan, worker, server)
            if scheduled:
                request = pack_request(spec, [s.task for s in scheduled], inputs[worker])
                check_request_headers(build_task_headers(scheduled, num_heads, num_kv_heads, head_dim), scheduled,
                                      spec, worker, server)
                received += [(worker, s, tensors) for s, tensors in
                             zip(scheduled, unpack_request(spec, [s.task for s in scheduled], request))]
        assert len(rebatch(received).task_ids) == sum(t.server == server for t in plan.tasks)
        results = compute_results(received, spec, TORCH_KERNEL)
        for worker in range(len(lengths)):  # server -> workers
            scheduled = tasks_between(plan, worker, server)
            message = pack_results(spec, results.get(worker, []))
            assert read_status(message, spec.dtype) == (0, -1)
            for s, (out, lse) in zip(scheduled, unpack_results(spec, [s.task for s in scheduled], message, server)):
                outs[worker][s.task.q_start:s.task.q_end] = out
                lses[worker][:, s.task.q_start:s.task.q_end] = lse

    assert max(t.task.doc_len for t in plan.tasks) > 16 and any(t.task.q_start > t.task.doc_start
                                                                 for t in plan.tasks)  # chunked documents
    for worker, x in enumerate(inputs):
        ref_out, ref_lse = reference_attention(x["q"][None], x["k"][None], x["v"][None], causal=causal,
                                               doc_ids=docs[worker], window=window)
        torch.testing.assert_close(outs[worker], ref_out[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(lses[worker], ref_lse[0], rtol=0, atol=1e-10)


def test_rebatch_rejects_conflicting_plans_and_results_of_wrong_size():
    scheduled, _ = sample_tasks()
    tasks = [s.task for s in scheduled]
    spec = spec_of(FORWARD, 4, 2, 8, torch.float32)
    x = {"q": torch.randn(137, 4, 8), "k": torch.randn(137, 2, 8), "v": torch.randn(137, 2, 8)}
    tensors = unpack_request(spec, tasks, pack_request(spec, tasks, x))
    received = [(sender, s, t) for sender in (0, 1) for s, t in zip(scheduled, tensors)]
    with pytest.raises(ValueError, match="different plans"):
        rebatch(received)
    with pytest.raises(ValueError, match="from rank 5"):
        unpack_results(spec, tasks, torch.zeros(7), 5)

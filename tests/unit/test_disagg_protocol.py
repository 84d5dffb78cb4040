"""Wire format of the attention servers, and exactness of the server's single rebatched kernel call."""

import pytest
import torch

from lctrain.attention import reference_attention
from lctrain.disagg.protocol import (
    META_HEADER,
    Field,
    build_task_headers,
    pack_metadata,
    pack_payload,
    pack_results,
    unpack_metadata,
    unpack_payload,
    validate_headers,
    write_results,
)
from lctrain.disagg.rebatch import rebatch
from lctrain.disagg.scheduler import AttentionShape, plan_from_lengths

SENDER = 3


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


def sample_headers():
    lengths = [[40, 7, 90], [12, 30], [200]]
    plan = plan_from_lengths(lengths, AttentionShape(4, 2, 8), mode="dedicated", num_servers=2, chunk_tokens=32)
    tasks = plan.tasks_between(0, plan.server_ranks[0])
    assert len(tasks) >= 2
    return build_task_headers(tasks, 4, 2, 8), plan.server_ranks[0]


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


def test_payload_round_trip():
    headers, _ = sample_headers()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(137, h, 8, generator=gen) for h in (4, 2, 2))
    payload = pack_payload(headers, q, k, v[None])
    assert payload.numel() == int(headers[:, Field.PAYLOAD_NUMEL].sum())
    for row, (tq, tk, tv) in zip(headers.tolist(), unpack_payload(headers, payload)):
        qs, ql, ks, kl = row[Field.Q_START], row[Field.Q_LEN], row[Field.KV_START], row[Field.KV_LEN]
        assert torch.equal(tq, q[qs:qs + ql]) and torch.equal(tk, k[ks:ks + kl]) and torch.equal(tv, v[ks:ks + kl])


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
    gen = torch.Generator().manual_seed(1)
    inputs, docs = [], []
    for worker_lengths in lengths:
        seq = sum(worker_lengths) + num_pad
        inputs.append([torch.randn(1, seq, h, head_dim, generator=gen, dtype=torch.float64)
                       for h in (num_heads, num_kv_heads, num_kv_heads)])
        docs.append(torch.cat([torch.full((n,), i) for i, n in enumerate(worker_lengths)]
                              + [torch.full((num_pad,), -1)]))

    # Workers -> servers: headers and payload per (worker, server) pair.
    outs = [torch.zeros_like(q[0]) for q, _, _ in inputs]
    lses = [torch.full((num_heads, q.shape[1]), float("-inf"), dtype=torch.float64) for q, _, _ in inputs]
    for server in plan.server_ranks:
        received, headers_of = [], {}
        for worker in range(len(lengths)):
            headers = build_task_headers(plan.tasks_between(worker, server), num_heads, num_kv_heads, head_dim)
            payload = pack_payload(headers, *inputs[worker])
            validate_headers(headers, payload.numel(), worker, receiver_rank=server, num_heads=num_heads)
            received.append((worker, headers, payload))
            headers_of[worker] = headers
        call = rebatch([r for r in received if r[1].shape[0]])
        assert len(call.task_ids) == sum(len(h) for h in headers_of.values())
        out, lse = call.run(causal=causal, window=window)
        for worker, results in call.split(out, lse).items():  # server -> worker
            out_flat, lse_flat = pack_results(results)
            write_results(headers_of[worker], out_flat, lse_flat, server, outs[worker], lses[worker])

    assert max(t.task.doc_len for t in plan.tasks) > 16 and any(t.task.q_start > t.task.doc_start
                                                                 for t in plan.tasks)  # chunked documents
    for worker, (q, k, v) in enumerate(inputs):
        ref_out, ref_lse = reference_attention(q, k, v, causal=causal, doc_ids=docs[worker], window=window)
        torch.testing.assert_close(outs[worker], ref_out[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(lses[worker], ref_lse[0], rtol=0, atol=1e-10)


def test_rebatch_rejects_conflicting_plans_and_results_of_wrong_size():
    headers, _ = sample_headers()
    q, k, v = (torch.randn(137, h, 8) for h in (4, 2, 2))
    payload = pack_payload(headers, q, k, v)
    with pytest.raises(ValueError, match="different plans"):
        rebatch([(0, headers, payload), (1, headers, payload)])
    with pytest.raises(ValueError, match="from rank 5"):
        write_results(headers, torch.zeros(3), torch.zeros(1), 5, torch.zeros(137, 4, 8), torch.zeros(4, 137))

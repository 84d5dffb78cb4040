"""Context-parallel strategies with kernel="triton" (interpreter, 2 gloo ranks) stay exact.

The ranks are spawned with TRITON_INTERPRET=1 in their environment, so triton is
first imported there in interpreter mode (see test_triton_attention.py for why
that must come first); every strategy runs the Triton kernels per block on CPU.
"""

from __future__ import annotations

import io
import os

import pytest
import torch
import torch.distributed as dist

from lctrain.attention import Coords, Mask, build_attention, get_layout, reference_attention
from lctrain.distributed.spawn import run_ranks

pytest.importorskip("triton")

CASES = [("ring", "striped", True), ("ring", "contiguous", False), ("ring", "zigzag", True),
         ("allgather", "striped", True), ("tree", "zigzag", True), ("ulysses", "contiguous", True)]
SEQ, HEADS, KV_HEADS, HEAD_DIM = 40, 4, 2, 16


def _inputs():
    gen = torch.Generator().manual_seed(7)
    q, dout = (torch.randn(1, SEQ, HEADS, HEAD_DIM, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, SEQ, KV_HEADS, HEAD_DIM, generator=gen) for _ in range(2))
    doc = torch.repeat_interleave(torch.tensor([0, 1, 2]), torch.tensor([11, 21, 8]))
    return q, k, v, dout, doc


def _worker(rank, world):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    dist.init_process_group("gloo")
    q, k, v, dout, doc = _inputs()
    results = {}
    for strategy, name, causal in CASES:
        layout = get_layout(name, world)
        attn = build_attention(strategy=strategy, layout=layout, kernel="triton")
        ql, kl, vl = (layout.shard(x, rank, dim=1).requires_grad_() for x in (q, k, v))
        coords = Coords(layout.positions(SEQ, rank), layout.shard(doc, rank, dim=0))
        out, lse = attn(ql, kl, vl, coords, Mask(causal, window=13), return_lse=True)
        out.backward(layout.shard(dout, rank, dim=1))
        results[strategy, name] = dict(out=out.detach(), lse=lse, dq=ql.grad, dk=kl.grad, dv=vl.grad)
    buffer = io.BytesIO()
    torch.save(results, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def triton_ranks():
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # inherited by the spawned ranks
    try:
        return [torch.load(io.BytesIO(data)) for data in run_ranks(_worker, 2, timeout=240)]
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


@pytest.mark.parametrize("strategy, layout_name, causal", CASES)
def test_strategy_with_triton_kernel_matches_reference(triton_ranks, strategy, layout_name, causal):
    q, k, v, dout, doc = (x.double() if x.is_floating_point() else x for x in _inputs())
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out_ref, lse_ref = reference_attention(q, k, v, causal=causal, doc_ids=doc, window=13)
    out_ref.backward(dout)
    expected = dict(out=out_ref.detach(), lse=lse_ref, dq=q.grad, dk=k.grad, dv=v.grad)
    layout = get_layout(layout_name, 2)
    for name, want in expected.items():
        got = layout.unshard([r[strategy, layout_name][name] for r in triton_ranks], dim=2 if name == "lse" else 1)
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5, msg=lambda m: f"{name}: {m}")

"""The Triton kernels at real sizes on a CUDA GPU (skipped without one): out, lse, dq, dk, dv in
bf16/fp16 against the PyTorch blockwise kernel run in float32 on the same rounded inputs.

    pytest tests/kernels/test_triton_gpu.py          # on a machine with a GPU

Sizes are those of a context-parallel block: thousands of tokens, 16-32 heads, GQA, packed
documents, windows, striped and offset coordinates, head dims 64-256, autotuned configs.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# name: (seq_q, seq_k, heads, kv_heads, head_dim, causal, window, coordinates)
CASES = {
    "causal_8k_d128_gqa": (8192, 8192, 32, 8, 128, True, None, "one_doc"),
    "noncausal_4k_d64": (4096, 4096, 16, 16, 64, False, None, "one_doc"),
    "packed_docs_16k_d128": (16384, 16384, 16, 4, 128, True, None, "packed"),
    "window_8k_d128": (8192, 8192, 16, 4, 128, True, 1024, "packed"),
    "striped_block_d128": (4096, 4096, 16, 4, 128, True, None, "striped"),
    "offset_odd_d96": (3001, 7777, 12, 4, 96, True, None, "offset"),
    "causal_4k_d256": (4096, 4096, 8, 2, 256, True, None, "one_doc"),
}
# max |got - want| <= tolerance * max |want| per tensor, against fp32 on the same rounded inputs
# (scaled by the tensor's magnitude: the kernels round probabilities to 16 bits before their
# products, so gradient errors grow with the sequence like any flash kernel's).
TOLERANCE = {torch.bfloat16: 2.5e-2, torch.float16: 5e-3}


def coordinates(kind: str, seq_q: int, seq_k: int, gen: torch.Generator):
    k_pos = torch.arange(seq_k)
    if kind == "striped":  # rank 1 of 4: its queries against rank 3's keys
        q_pos, k_pos = torch.arange(1, 4 * seq_q, 4), torch.arange(3, 4 * seq_k, 4)
    elif kind == "offset":  # the last query chunk of a longer sequence
        q_pos = torch.arange(seq_k - seq_q, seq_k)
    else:
        q_pos = torch.arange(seq_q)
    if kind in ("packed", "striped"):
        total = int(max(q_pos.max(), k_pos.max())) + 1
        lengths = (torch.rand(64, generator=gen) * 2 * total / 64).long().clamp(min=1)
        doc_of = torch.repeat_interleave(torch.arange(64), lengths)
        doc_of = torch.cat([doc_of, doc_of.new_full((max(0, total - len(doc_of)),), 63)])[:total]
        return q_pos, k_pos, doc_of[q_pos], doc_of[k_pos]
    return q_pos, k_pos, torch.zeros_like(q_pos), torch.zeros_like(k_pos)


def max_error(got, want, dtype) -> float:
    """max |got - want| / (tolerance * max |want|): <= 1 passes. -inf lse rows must match."""
    got, want = got.float(), want.float()
    assert not torch.isnan(got).any()
    both_inf = torch.isinf(want) & (got == want)
    diff = torch.where(both_inf, 0.0, (got - want).abs()).nan_to_num(math.inf)
    scale = want.masked_fill(torch.isinf(want), 0).abs().max().clamp(min=1e-6)
    return float(diff.max() / (TOLERANCE[dtype] * scale))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_float32_blockwise(name, dtype):
    from lctrain_kernels.torch_blockwise import blockwise_backward, blockwise_forward
    from lctrain_kernels.mask import Coords, Mask
    from lctrain_kernels.triton.attention import triton_backward, triton_forward

    seq_q, seq_k, heads, kv_heads, dim, causal, window, kind = CASES[name]
    gen = torch.Generator().manual_seed(seq_q * 31 + dim)
    q_pos, k_pos, q_doc, k_doc = (c.cuda() for c in coordinates(kind, seq_q, seq_k, gen))
    q = torch.randn(1, seq_q, heads, dim, generator=gen).to("cuda", dtype)
    k, v = (torch.randn(1, seq_k, kv_heads, dim, generator=gen).to("cuda", dtype) for _ in range(2))
    dout = torch.randn(1, seq_q, heads, dim, generator=gen).to("cuda", dtype)
    coords = (Coords(q_pos, q_doc), Coords(k_pos, k_doc), Mask(causal, window))

    out, lse = triton_forward(q, k, v, *coords)
    grads = triton_backward(dout, q, k, v, out, lse, *coords)
    ref_out, ref_lse = blockwise_forward(q.float(), k.float(), v.float(), *coords)
    ref_grads = blockwise_backward(dout.float(), q.float(), k.float(), v.float(), ref_out, ref_lse, *coords)
    errors = {n: max_error(g, r, dtype) for n, g, r in
              zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (ref_out, ref_lse, *ref_grads))}
    assert max(errors.values()) <= 1.0, errors

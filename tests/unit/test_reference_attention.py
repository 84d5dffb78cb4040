"""dense_attention / reference_attention against a naive per-row implementation (float64)."""

import math

import pytest
import torch

from lctrain.attention import reference_attention
from lctrain_kernels.mask import Coords, Mask
from lctrain_kernels.reference import dense_attention

NEG_INF = float("-inf")


def naive_attention(q, k, v, q_pos, k_pos, q_doc, k_doc, causal, window, scale):
    """One query row at a time, the mask rule spelled out on Python ints."""
    batch, seq_q, num_heads, head_dim = q.shape
    group = num_heads // k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    q_pos, k_pos = [c.expand(batch, -1).tolist() for c in (q_pos, k_pos)]
    q_doc, k_doc = [c.expand(batch, -1).tolist() for c in (q_doc, k_doc)]
    out_rows, lse_rows = [], []
    for b in range(batch):
        for head in range(num_heads):
            for i in range(seq_q):
                keys = []
                for j in range(k.shape[1]):
                    same_doc = q_doc[b][i] == k_doc[b][j] and q_doc[b][i] != -1
                    gap = q_pos[b][i] - k_pos[b][j]
                    in_past = gap >= 0 or not causal
                    in_window = window is None or (gap if causal else abs(gap)) < window
                    if same_doc and in_past and in_window:
                        keys.append(j)
                if not keys:
                    out_rows.append(torch.zeros(head_dim, dtype=q.dtype))
                    lse_rows.append(torch.tensor(NEG_INF, dtype=q.dtype))
                    continue
                scores = (k[b, keys, head // group] @ q[b, i, head]) * scale
                lse = torch.logsumexp(scores, dim=0)
                out_rows.append(torch.exp(scores - lse) @ v[b, keys, head // group])
                lse_rows.append(lse)
    out = torch.stack(out_rows).view(batch, num_heads, seq_q, head_dim).transpose(1, 2)
    return out, torch.stack(lse_rows).view(batch, num_heads, seq_q)


def make_inputs(batch, seq_q, seq_k, num_heads, num_kv_heads, head_dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    return rand(batch, seq_q, num_heads, head_dim), rand(batch, seq_k, num_kv_heads, head_dim), \
        rand(batch, seq_k, num_kv_heads, head_dim)


def grads(out, inputs, seed=1):
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, dout)


S = 20
ARANGE = torch.arange(S)
DOCS = torch.tensor([0] * 7 + [1] * 9 + [2] * 4)
CASES = {
    "causal_mha": dict(heads=(2, 2), causal=True),
    "noncausal_gqa": dict(heads=(4, 2), causal=False),
    "causal_mqa_docs": dict(heads=(4, 1), causal=True, doc=DOCS),
    "window_causal": dict(heads=(2, 1), causal=True, window=5, doc=DOCS),
    "window_noncausal": dict(heads=(2, 2), causal=False, window=4),
    "striped_blocks": dict(heads=(2, 1), causal=True, q_pos=torch.arange(0, 2 * S, 2),
                           k_pos=torch.arange(1, 2 * S, 2)),
    "padding_batched": dict(heads=(2, 2), causal=True,
                            doc=torch.stack([DOCS, torch.where(ARANGE < 15, 0, -1)])),
    "custom_scale": dict(heads=(2, 2), causal=False, scale=0.3),
}


@pytest.mark.parametrize("name", CASES)
def test_dense_matches_naive(name):
    case = CASES[name]
    num_heads, num_kv_heads = case["heads"]
    q, k, v = make_inputs(2, S, S, num_heads, num_kv_heads)
    doc = case.get("doc", torch.zeros(S, dtype=torch.long))
    args = (case.get("q_pos", ARANGE), case.get("k_pos", ARANGE), doc, doc,
            case["causal"], case.get("window"), case.get("scale"))

    q_pos, k_pos, q_doc, k_doc, causal, window, scale = args
    out, lse = dense_attention(q, k, v, Coords(q_pos, q_doc), Coords(k_pos, k_doc), Mask(causal, window), scale)
    out_naive, lse_naive = naive_attention(q, k, v, *args)
    torch.testing.assert_close(out, out_naive, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, lse_naive, atol=1e-12, rtol=0)
    assert lse.dtype == torch.float64
    for got, want in zip(grads(out, (q, k, v)), grads(out_naive, (q, k, v))):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_fully_masked_rows_are_zero_and_nan_free():
    q, k, v = make_inputs(1, S, S, 2, 1)
    # Queries at positions 0..19 see keys at 10..29 causally: rows 0..9 see nothing,
    # and padding queries (doc -1) see nothing either.
    q_doc = torch.where(ARANGE % 5 == 4, -1, 0)
    out, lse = dense_attention(q, k, v, Coords(ARANGE, q_doc), Coords(ARANGE + 10, torch.zeros(S, dtype=torch.long)))
    hidden = (ARANGE < 10) | (q_doc == -1)
    assert torch.all(out[:, hidden] == 0)
    assert torch.all(lse[:, :, hidden] == NEG_INF)
    assert torch.isfinite(lse[:, :, ~hidden]).all()
    dq, dk, dv = grads(out, (q, k, v))
    for grad in (dq, dk, dv):
        assert not torch.isnan(grad).any()
    assert torch.all(dq[:, hidden] == 0)


def test_lse_is_float32_for_half_inputs():
    q, k, v = (x.detach().to(torch.bfloat16) for x in make_inputs(1, 8, 8, 2, 2))
    out, lse = reference_attention(q, k, v)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32


@pytest.mark.parametrize("doc_ids", [None, DOCS, torch.stack([DOCS, DOCS.flip(0)])])
def test_reference_attention_uses_arange_positions(doc_ids):
    q, k, v = make_inputs(2, S, S, 4, 2)
    out, lse = reference_attention(q, k, v, causal=True, doc_ids=doc_ids, window=6)
    doc = torch.zeros(S, dtype=torch.long) if doc_ids is None else doc_ids
    out_naive, lse_naive = naive_attention(q, k, v, ARANGE, ARANGE, doc, doc, True, 6, None)
    torch.testing.assert_close(out, out_naive, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, lse_naive, atol=1e-12, rtol=0)


def test_reference_attention_rejects_different_lengths():
    q, _, _ = make_inputs(1, 8, 8, 2, 2)
    _, k, v = make_inputs(1, 8, 6, 2, 2)
    with pytest.raises(ValueError, match="same sequence"):
        reference_attention(q, k, v)

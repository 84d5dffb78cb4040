"""The blockwise PyTorch kernel against the dense reference: out, lse, dq, dk, dv."""

import pytest
import torch

from lctrain.attention import Coords, Mask, build_attention, get_layout, merge_partials, reference_attention
from lctrain_kernels.mask import count_visible_pairs, tile_fully_visible, tile_may_be_visible, tile_ranges, visible_mask
from lctrain_kernels.reference import dense_attention
from lctrain_kernels.torch_blockwise import (
    blockwise_attention,
    blockwise_backward,
    blockwise_forward,
)

NEG_INF = float("-inf")
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5}


def packed_docs(seq_len, boundaries):
    """Document ids for a packed sequence whose documents start at ``boundaries``."""
    starts = torch.zeros(seq_len, dtype=torch.long)
    starts[list(boundaries)] = 1
    return torch.cumsum(starts, 0)


def make_case(name):
    """(sq, sk, heads, kv_heads, q_pos, k_pos, q_doc, k_doc, causal, window) of a scenario."""
    n = 48
    ar = torch.arange(n)
    one_doc = torch.zeros(n, dtype=torch.long)
    docs = packed_docs(n, [5, 6, 21, 40])
    if name == "causal_mha":
        return n, n, 2, 2, ar, ar, one_doc, one_doc, True, None
    if name == "noncausal_gqa4":
        return n, n, 8, 2, ar, ar, one_doc, one_doc, False, None
    if name == "causal_mqa_docs":
        return n, n, 4, 1, ar, ar, docs, docs, True, None
    if name == "noncausal_docs":
        return n, n, 4, 2, ar, ar, docs, docs, False, None
    if name == "window_causal":
        return n, n, 4, 2, ar, ar, docs, docs, True, 7
    if name == "window_noncausal":
        return n, n, 2, 1, ar, ar, one_doc, one_doc, False, 5
    if name == "odd_lengths":  # a later query chunk over all keys so far, with documents
        k_pos = torch.arange(131)
        k_doc = packed_docs(131, [50, 77])
        return 67, 131, 4, 1, k_pos[64:], k_pos, k_doc[64:], k_doc, True, None
    if name == "striped":  # q at even positions, k at odd ones: no diagonal in the block
        return n, n, 4, 2, torch.arange(0, 2 * n, 2), torch.arange(1, 2 * n, 2), docs, docs, True, 9
    if name == "padding_batched":  # (b, s) coordinates, different per sequence, -1 padding
        pad = torch.stack([one_doc, torch.where(ar < 30, docs, -1)])
        pos = torch.stack([ar, ar + 100])
        return n, n, 2, 2, pos, pos, pad, pad, True, None
    if name == "fully_masked_rows":  # queries 0..47 over keys 24..71: first half sees nothing
        return n, n, 2, 1, ar, ar + 24, one_doc, one_doc, True, None
    raise AssertionError(name)


CASES = ["causal_mha", "noncausal_gqa4", "causal_mqa_docs", "noncausal_docs", "window_causal",
         "window_noncausal", "odd_lengths", "striped", "padding_batched", "fully_masked_rows"]
BLOCKS = [(16, 32), (13, 7), (512, 512)]


def kernel_args(q_pos, k_pos, q_doc, k_doc, causal, window):
    """The kernels' (q_coords, k_coords, mask) of a case's coordinates."""
    return Coords(q_pos, q_doc), Coords(k_pos, k_doc), Mask(causal, window)


def random_qkv(seq_q, seq_k, num_heads, num_kv_heads, dtype, batch=2, head_dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    return (rand(batch, seq_q, num_heads, head_dim), rand(batch, seq_k, num_kv_heads, head_dim),
            rand(batch, seq_k, num_kv_heads, head_dim))


def random_like(x, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype)


def check_against_dense(q, k, v, coords, causal, window, atol, rtol, blocks=(16, 32)):
    args = kernel_args(*coords, causal, window)
    out, lse = blockwise_attention(q, k, v, *args, None, *blocks)
    # The reference sees the same (possibly rounded) inputs, computed in float64.
    wide = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out_ref, lse_ref = dense_attention(*wide, *args)
    dout = random_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    grads_ref = torch.autograd.grad(out_ref, wide, dout.double())

    assert out.dtype == q.dtype
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), out_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), lse_ref, atol=atol, rtol=rtol)
    for name, got, want in zip("qkv", grads, grads_ref):
        assert got.dtype == q.dtype and not torch.isnan(got).any(), name
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, msg=f"d{name}")
    return out, lse, grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("name", CASES)
def test_blockwise_matches_dense(name, blocks, dtype):
    seq_q, seq_k, num_heads, num_kv_heads, q_pos, k_pos, q_doc, k_doc, causal, window = make_case(name)
    q, k, v = random_qkv(seq_q, seq_k, num_heads, num_kv_heads, dtype)
    tol = TOLERANCES[dtype]
    check_against_dense(q, k, v, (q_pos, k_pos, q_doc, k_doc), causal, window, tol, tol, blocks)


def test_fully_masked_rows_give_zero_out_and_grads():
    seq_q, seq_k, num_heads, num_kv_heads, q_pos, k_pos, q_doc, k_doc, causal, window = \
        make_case("fully_masked_rows")
    q, k, v = random_qkv(seq_q, seq_k, num_heads, num_kv_heads, torch.float32)
    out, lse, (dq, _, _) = check_against_dense(
        q, k, v, (q_pos, k_pos, q_doc, k_doc), causal, window, 1e-5, 1e-5)
    hidden = q_pos < 24
    assert torch.all(out[:, hidden] == 0)
    assert torch.all(lse[:, :, hidden] == NEG_INF)
    assert torch.all(dq[:, hidden] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["causal_mha", "causal_mqa_docs", "striped"])
def test_half_precision_within_transformer_engine_tolerance(name, dtype):
    seq_q, seq_k, num_heads, num_kv_heads, q_pos, k_pos, q_doc, k_doc, causal, window = make_case(name)
    q, k, v = random_qkv(seq_q, seq_k, num_heads, num_kv_heads, dtype)
    tol = 2.5e-2 if num_heads == num_kv_heads else 3.5e-2
    check_against_dense(q, k, v, (q_pos, k_pos, q_doc, k_doc), causal, window, tol, tol)


@pytest.mark.parametrize("name", ["causal_mqa_docs", "window_causal", "odd_lengths", "fully_masked_rows"])
def test_backward_with_merged_lse_sums_to_full_gradient(name):
    """Split the keys in two, merge the partial results, backward each half with the
    merged out / lse: the halves' gradients must add up to the full ones."""
    seq_q, seq_k, num_heads, num_kv_heads, q_pos, k_pos, q_doc, k_doc, causal, window = make_case(name)
    q, k, v = random_qkv(seq_q, seq_k, num_heads, num_kv_heads, torch.float64)
    out_ref, lse_ref = dense_attention(q, k, v, *kernel_args(q_pos, k_pos, q_doc, k_doc, causal, window))
    dout = random_like(out_ref)
    dq_ref, dk_ref, dv_ref = torch.autograd.grad(out_ref, (q, k, v), dout)

    q, k, v = q.detach(), k.detach(), v.detach()
    split = seq_k // 3
    halves = [slice(0, split), slice(split, seq_k)]
    partials = [blockwise_forward(q, k[:, h], v[:, h], *kernel_args(q_pos, k_pos[h], q_doc, k_doc[h], causal,
                                                                     window), None, 16, 16) for h in halves]
    out, lse = merge_partials(*partials[0], *partials[1])
    torch.testing.assert_close(out, out_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, lse_ref, atol=1e-10, rtol=1e-10)

    grads = [blockwise_backward(dout, q, k[:, h], v[:, h], out, lse,
                                *kernel_args(q_pos, k_pos[h], q_doc, k_doc[h], causal, window), None,
                                block_q=16, block_k=16)
             for h in halves]
    torch.testing.assert_close(grads[0][0] + grads[1][0], dq_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(torch.cat([grads[0][1], grads[1][1]], 1), dk_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(torch.cat([grads[0][2], grads[1][2]], 1), dv_ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 6])
def test_tile_range_tests_agree_with_mask(seed, causal, window):
    """A tile declared invisible has no visible pair; one declared fully visible has no hidden pair."""
    gen = torch.Generator().manual_seed(seed)
    def coords(n):
        pos = torch.sort(torch.randint(0, 40, (n,), generator=gen)).values
        doc = torch.sort(torch.randint(-1, 3, (n,), generator=gen)).values
        return pos, doc
    (q_pos, q_doc), (k_pos, k_doc) = coords(32), coords(32)
    rule = Mask(causal, window)
    mask = visible_mask(Coords(q_pos, q_doc), Coords(k_pos, k_doc), rule)[0]
    decided = 0
    for i, q_range in enumerate(tile_ranges(Coords(q_pos, q_doc), 4)):
        for j, k_range in enumerate(tile_ranges(Coords(k_pos, k_doc), 4)):
            tile = mask[4 * i:4 * i + 4, 4 * j:4 * j + 4]
            if not tile_may_be_visible(q_range, k_range, rule):
                assert not tile.any()
                decided += 1
            if tile_fully_visible(q_range, k_range, rule):
                assert tile.all()
                decided += 1
    assert decided > 0  # the test exercises the shortcuts at all


def test_causal_plan_skips_upper_triangle():
    coords = Coords.of_sequence(64)
    q_ranges, k_ranges = tile_ranges(coords, 16), tile_ranges(coords, 16)
    visited = [(i, j) for i, qr in enumerate(q_ranges) for j, kr in enumerate(k_ranges)
               if tile_may_be_visible(qr, kr, Mask())]
    full = [(i, j) for i, qr in enumerate(q_ranges) for j, kr in enumerate(k_ranges)
            if tile_fully_visible(qr, kr, Mask())]
    assert visited == [(i, j) for i in range(4) for j in range(i + 1)]
    assert full == [(i, j) for i in range(4) for j in range(i)]


@pytest.mark.parametrize("doc_ids", [None, packed_docs(40, [9, 30])])
@pytest.mark.parametrize("kernel", ["torch", "auto"])
def test_build_attention_none_matches_reference(kernel, doc_ids):
    attn = build_attention(strategy="none", kernel=kernel)
    assert attn.kernel_name == kernel  # "auto" resolves per call: the PyTorch kernel for CPU fp64
    q, k, v = random_qkv(40, 40, 4, 2, torch.float64)
    coords = None if doc_ids is None else Coords(torch.arange(40), doc_ids)
    out, lse = attn(q, k, v, coords, Mask(causal=True, window=11), return_lse=True)
    out_ref, lse_ref = reference_attention(q, k, v, causal=True, doc_ids=doc_ids, window=11)
    torch.testing.assert_close(out, out_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, lse_ref, atol=1e-10, rtol=1e-10)
    dout = random_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), dout),
                         torch.autograd.grad(out_ref, (q, k, v), dout)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_build_attention_positions_are_global():
    """Tokens 100..139 with explicit positions attend exactly as arange positions would."""
    q, k, v = random_qkv(40, 40, 2, 2, torch.float64)
    attn = build_attention()
    shifted = attn(q, k, v, Coords(torch.arange(100, 140), torch.zeros(40, dtype=torch.long)), Mask(window=5))
    torch.testing.assert_close(shifted, attn(q, k, v, mask=Mask(window=5)), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(strategy="spiral"), "available: none, ring, allgather, ulysses, usp, tree, disagg"),
    (dict(strategy="ring"), "needs layout=get_layout"),
    (dict(kernel="cuda"), "torch, auto, triton"),
    (dict(strategy="ring", layout=get_layout("striped", 1), query_chunk=4), "takes no option"),
    (dict(layout=object()), "layout=None"),
])
def test_build_attention_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_attention(**kwargs)


def test_attention_call_rejects_bad_shapes():
    attn = build_attention()
    q, k, v = random_qkv(8, 8, 3, 2, torch.float32)
    with pytest.raises(ValueError, match="multiple of the number of K/V heads"):
        attn(q, k, v)
    q, k, v = random_qkv(8, 8, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="4-D"):
        attn(q[0], k, v)
    with pytest.raises(ValueError, match="same shape"):
        attn(q, k, v[:, :4])
    with pytest.raises(ValueError, match=r"doc_ids must have shape \(8,\) or \(2, 8\)"):
        attn(q, k, v, Coords(torch.arange(8), torch.zeros(7, dtype=torch.long)))
    with pytest.raises(ValueError, match="window"):
        attn(q, k, v, mask=Mask(window=0))


def test_blockwise_forward_can_keep_a_bf16_partial_in_float32():
    """Strategies merge partials later: out_dtype=float32 returns the unrounded partial."""
    q, k, v = random_qkv(40, 40, 4, 2, torch.float32)
    pos, doc = torch.arange(40), packed_docs(40, [9, 30])
    qb, kb, vb = (x.to(torch.bfloat16) for x in (q, k, v))
    args = kernel_args(pos, pos, doc, doc, True, 11)
    out32, lse32 = blockwise_forward(qb, kb, vb, *args, out_dtype=torch.float32)
    want, want_lse = blockwise_forward(qb.float(), kb.float(), vb.float(), *args)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse32, want_lse, atol=1e-6, rtol=1e-6)
    rounded, _ = blockwise_forward(qb, kb, vb, *args)
    assert rounded.dtype == torch.bfloat16 and not torch.equal(rounded.float(), out32)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 1, 6])
def test_count_visible_pairs_equals_the_dense_mask(seed, causal, window):
    """The counters' binary-search count is the mask rule's dense count: padding anywhere,
    unsorted positions, several documents, (s,) against (b, s) coordinates."""
    gen = torch.Generator().manual_seed(seed)
    q_pos = torch.randint(-5, 60, (2, 37), generator=gen)
    q_doc = torch.randint(-1, 4, (2, 37), generator=gen)
    k_pos, k_doc = torch.randint(-5, 60, (29,), generator=gen), torch.randint(-1, 4, (29,), generator=gen)
    q, k, mask = Coords(q_pos, q_doc), Coords(k_pos, k_doc), Mask(causal, window)
    got = count_visible_pairs(q, k, mask)
    assert got.dim() == 0 and got.dtype == torch.int64
    assert int(got) == int(visible_mask(q, k, mask).sum())

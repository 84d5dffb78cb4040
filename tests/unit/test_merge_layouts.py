"""merge_partials (log-sum-exp merge of key blocks) and the context-parallel layouts."""

import pytest
import torch

from lctrain.attention import Layout, get_layout, merge_partials
from lctrain_kernels.mask import Coords, Mask
from lctrain_kernels.reference import dense_attention

NEG_INF = float("-inf")


def random_qkv(seq_len, num_heads=4, num_kv_heads=2, head_dim=8, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seq_len, heads, head_dim, generator=gen, dtype=torch.float64)
            for heads in (num_heads, num_kv_heads, num_kv_heads)]


@pytest.mark.parametrize("split", [1, 9, 20, 39])
@pytest.mark.parametrize("causal", [True, False])
def test_merge_of_two_key_blocks_equals_full_attention(split, causal):
    q, k, v = random_qkv(40)
    pos = torch.arange(40)
    doc = torch.tensor([0] * 12 + [1] * 28)
    coords, mask = Coords(pos, doc), Mask(causal, 15)
    out_ref, lse_ref = dense_attention(q, k, v, coords, coords, mask)
    blocks = [slice(0, split), slice(split, 40)]
    partials = [dense_attention(q, k[:, b], v[:, b], coords, Coords(pos[b], doc[b]), mask) for b in blocks]
    # Order must not matter.
    for first, second in (partials, partials[::-1]):
        out, lse = merge_partials(*first, *second)
        torch.testing.assert_close(out, out_ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(lse, lse_ref, atol=1e-12, rtol=0)


def test_merge_handles_empty_sides_without_nan():
    b, s, h, d = 1, 3, 1, 2
    out_a = torch.tensor([[[[1.0, 2.0]], [[0.0, 0.0]], [[0.0, 0.0]]]])
    out_b = torch.tensor([[[[0.0, 0.0]], [[3.0, 4.0]], [[0.0, 0.0]]]])
    # Row 0: only side a saw keys; row 1: only side b; row 2: neither.
    lse_a = torch.tensor([[[0.5, NEG_INF, NEG_INF]]])
    lse_b = torch.tensor([[[NEG_INF, 1.5, NEG_INF]]])
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    assert out.shape == (b, s, h, d) and lse.shape == (b, h, s)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, out_a + out_b, atol=0, rtol=0)
    torch.testing.assert_close(lse, torch.tensor([[[0.5, 1.5, NEG_INF]]]), atol=0, rtol=0)


def test_merge_computes_in_float32_for_half_inputs():
    out = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    lse = torch.randn(1, 2, 4)
    merged_out, merged_lse = merge_partials(out, lse, out, lse)
    assert merged_out.dtype == torch.float32 and merged_lse.dtype == torch.float32
    torch.testing.assert_close(merged_out, out.float(), atol=0, rtol=0)
    torch.testing.assert_close(merged_lse, lse + torch.log(torch.tensor(2.0)), atol=1e-6, rtol=0)


NAMES = ["contiguous", "zigzag", "striped"]


@pytest.mark.parametrize("cp_size", [1, 2, 4])
@pytest.mark.parametrize("name", NAMES)
def test_shard_unshard_round_trip_and_positions(name, cp_size):
    layout = get_layout(name, cp_size)
    assert isinstance(layout, Layout) and layout.name == name and layout.cp_size == cp_size
    seq_len = 8 * cp_size
    x = torch.randn(2, seq_len, 3)
    shards = [layout.shard(x, rank, dim=1) for rank in range(cp_size)]
    assert all(shard.shape == (2, seq_len // cp_size, 3) for shard in shards)  # balanced
    torch.testing.assert_close(layout.unshard(shards, dim=1), x, atol=0, rtol=0)

    arange = torch.arange(seq_len)
    all_positions = []
    for rank in range(cp_size):
        positions = layout.positions(seq_len, rank)
        assert positions.dtype == torch.long
        assert torch.all(positions[1:] > positions[:-1])  # kernels rely on monotonic coordinates
        torch.testing.assert_close(positions, layout.shard(arange, rank, dim=0), atol=0, rtol=0)
        torch.testing.assert_close(shards[rank], x[:, positions], atol=0, rtol=0)
        all_positions.append(positions)
    assert torch.equal(torch.sort(torch.cat(all_positions)).values, arange)  # a partition


@pytest.mark.parametrize("cp_size", [1, 3, 4])
def test_layout_rules(cp_size):
    seq_len = 24
    chunk = seq_len // cp_size
    for rank in range(cp_size):
        striped = get_layout("striped", cp_size).positions(seq_len, rank)
        assert torch.equal(striped, torch.arange(rank, seq_len, cp_size))
        contiguous = get_layout("contiguous", cp_size).positions(seq_len, rank)
        assert torch.equal(contiguous, torch.arange(rank * chunk, (rank + 1) * chunk))
        zigzag = get_layout("zigzag", cp_size).positions(seq_len, rank)
        half, mirror = chunk // 2, 2 * cp_size - 1 - rank
        expected = torch.cat([torch.arange(rank * half, (rank + 1) * half),
                              torch.arange(mirror * half, (mirror + 1) * half)])
        assert torch.equal(zigzag, expected)


def test_zigzag_balances_causal_work():
    """Every rank holds the same number of causal (query, key) pairs with keys on any rank."""
    layout, seq_len = get_layout("zigzag", 4), 64
    work = [int((layout.positions(seq_len, r) + 1).sum()) for r in range(4)]
    assert len(set(work)) == 1


@pytest.mark.parametrize("name, cp_size, multiple", [
    ("contiguous", 4, 4), ("zigzag", 4, 8), ("striped", 3, 3),
])
def test_bad_seq_len_names_the_multiple(name, cp_size, multiple):
    layout = get_layout(name, cp_size)
    assert layout.multiple == multiple
    layout.check_seq_len(5 * multiple)
    with pytest.raises(ValueError, match=f"multiple of {multiple}.*pad"):
        layout.positions(5 * multiple + 1, 0)
    with pytest.raises(ValueError, match=f"multiple of {multiple}"):
        layout.shard(torch.zeros(5 * multiple - 1), 0, dim=0)


def test_bad_layout_arguments():
    with pytest.raises(ValueError, match="contiguous, zigzag, striped"):
        get_layout("ring", 2)
    with pytest.raises(ValueError, match="cp_size"):
        get_layout("striped", 0)
    with pytest.raises(ValueError, match="rank"):
        get_layout("striped", 2).positions(8, 2)
    with pytest.raises(ValueError, match="one shard per rank"):
        get_layout("striped", 2).unshard([torch.zeros(4)], dim=0)
